"""Image URLs: only http(s), only public addresses (in every spelling) unless the node allows a
range, credentials and queries never shown, and a checksum mismatch that says nothing more.

Pure: no test here opens a connection. Literal addresses are resolved with AI_NUMERICHOST (no DNS
query); names are resolved by a stand-in resolver.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket

import pytest

from mikrom.settings import Settings
from mikrom.worker import images, urlguard
from mikrom.worker.urlguard import HostNotAllowed

REFUSED_URLS = [
    "http://127.0.0.1/vmlinux",
    "http://127.1/vmlinux",
    "http://2130706433/vmlinux",
    "http://0x7f000001/vmlinux",
    "http://0177.0.0.1/vmlinux",
    "http://0x7f.1/vmlinux",
    "http://[::1]/vmlinux",
    "http://[::ffff:127.0.0.1]/vmlinux",
    "http://[::ffff:7f00:1]/vmlinux",
    "http://[::127.0.0.1]/vmlinux",
    "http://[64:ff9b::7f00:1]/vmlinux",
    "http://[2002:a9fe:a9fe::1]/vmlinux",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://10.0.0.1/vmlinux",
    "http://172.16.0.1/vmlinux",
    "http://192.168.1.1/vmlinux",
    "http://100.64.0.1/vmlinux",
    "http://0.0.0.0/vmlinux",
    "http://0/vmlinux",
    "http://224.0.0.1/vmlinux",
    "http://255.255.255.255/vmlinux",
    "http://[fe80::1]/vmlinux",
    "http://[fc00::1]/vmlinux",
    "http://[fd12:3456::1]/vmlinux",
    "http://[ff02::1]/vmlinux",
    "http://[::]/vmlinux",
    "https://user:secret@127.1:8443/vmlinux?token=x",
]


def _no_dns(*args, **kwargs):
    raise AssertionError(f"a literal address must not be looked up: {args}")


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_loopback_link_local_private_and_special_addresses_are_refused_in_every_spelling(url):
    target = urlguard.parse(url)
    literal = urlguard.literal_address(target.host)
    assert literal is not None, "every spelling here is a literal address"
    assert not urlguard.address_allowed(literal)
    with pytest.raises(HostNotAllowed) as err:
        urlguard.resolve(target.host, target.port, getaddrinfo=_no_dns)
    assert str(err.value) == "the URL's host is not allowed"
    # and by the real resolver's parsing of the literal too (AI_NUMERICHOST: no query is sent)
    for *_, sockaddr in socket.getaddrinfo(target.host, target.port, 0, socket.SOCK_STREAM, 0,
                                           socket.AI_NUMERICHOST):
        assert not urlguard.address_allowed(sockaddr[0])


@pytest.mark.parametrize("spelling, canonical", [
    ("127.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"), ("::ffff:7f00:1", "::ffff:127.0.0.1"), ("0", "0.0.0.0"),
])
def test_legacy_spellings_are_read_as_the_resolver_reads_them(spelling, canonical):
    assert urlguard.literal_address(spelling) == ipaddress.ip_address(canonical)
    resolved = socket.getaddrinfo(spelling, 80, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)[0][4][0]
    assert ipaddress.ip_address(resolved) == ipaddress.ip_address(canonical)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"])
def test_a_public_address_passes_the_pure_check(address):
    # checked, never connected to
    assert urlguard.address_allowed(address)
    assert urlguard.resolve(address, 443, getaddrinfo=lambda *a: [
        (socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 443))
    ]) == [ipaddress.ip_address(address)]


def _resolver(*addresses):
    def getaddrinfo(host, port, *args):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in addresses]
    return getaddrinfo


def test_a_name_is_refused_if_any_address_it_resolves_to_is_refused():
    with pytest.raises(HostNotAllowed):
        urlguard.resolve("images.example.com", 443, getaddrinfo=_resolver("93.184.216.34", "10.1.2.3"))
    with pytest.raises(HostNotAllowed):
        urlguard.resolve("images.example.com", 443, getaddrinfo=_resolver("2606:2800:220:1::1", "::ffff:169.254.169.254"))
    with pytest.raises(HostNotAllowed) as err:
        urlguard.resolve("metadata.internal", 80, getaddrinfo=_resolver("169.254.169.254"))
    assert "169.254" not in str(err.value), "the error never says what the name resolved to"
    assert urlguard.resolve("images.example.com", 443, getaddrinfo=_resolver("93.184.216.34", "93.184.216.34")) == [
        ipaddress.ip_address("93.184.216.34")]


def test_a_name_that_does_not_resolve_is_an_os_error_not_a_refusal():
    with pytest.raises(OSError):
        urlguard.resolve("images.example.com", 443, getaddrinfo=_resolver())


def test_the_allow_list_lets_a_named_range_through_and_nothing_else():
    allowed = urlguard.parse_cidrs(" 10.96.0.0/12, 127.0.0.0/8,fd00:1::/64 ")
    assert urlguard.address_allowed("10.96.0.10", allowed)
    assert urlguard.address_allowed("127.0.0.1", allowed)
    assert urlguard.address_allowed("::ffff:127.0.0.1", allowed), "the mapped form of an allowed address"
    assert urlguard.address_allowed("fd00:1::5", allowed)
    assert not urlguard.address_allowed("10.0.0.1", allowed)
    assert not urlguard.address_allowed("169.254.169.254", allowed)
    assert not urlguard.address_allowed("fd00:2::5", allowed)
    assert urlguard.resolve("images.svc", 80, allowed, getaddrinfo=_resolver("10.100.0.7")) == [
        ipaddress.ip_address("10.100.0.7")]
    assert urlguard.resolve("127.1", 80, allowed, getaddrinfo=lambda *a: socket.getaddrinfo(*a)) == [
        ipaddress.ip_address("127.0.0.1")]


def test_the_allow_list_setting_is_read_from_the_environment_and_a_bad_entry_is_named():
    settings = Settings.from_env({"MIKROM_IMAGE_URL_ALLOWED_CIDRS": "10.96.0.0/12,192.168.7.0/24"})
    assert urlguard.parse_cidrs(settings.image_url_allowed_cidrs) == (
        ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("192.168.7.0/24"))
    assert urlguard.parse_cidrs(Settings().image_url_allowed_cidrs) == ()
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        urlguard.parse_cidrs("10.0.0.0/8,10.0.0.0/33")


@pytest.mark.parametrize("url", ["file:///etc/hostname", "ftp://images.example.com/x", "gopher://x/",
                                 "http:///nohost", "http://images.example.com:0/x",
                                 "http://images.example.com/a b", "http://images.example.com/\r\nX: y"])
def test_only_http_and_https_urls_with_a_host_are_accepted(url):
    with pytest.raises(urlguard.URLRefused):
        urlguard.parse(url)


def test_a_url_is_taken_apart_for_a_request_to_the_pinned_address():
    t = urlguard.parse("HTTPS://u%40x:p%3As@Images.Example.com:8443/a/b?q=1#frag")
    assert (t.scheme, t.host, t.port) == ("https", "images.example.com", 8443)
    assert t.request_path == "/a/b?q=1" and t.host_header == "images.example.com:8443"
    assert t.credentials == "u@x:p:s"
    v6 = urlguard.parse("http://[2606:2800:220:1::1]/k")
    assert (v6.host, v6.port, v6.host_header, v6.request_path) == ("2606:2800:220:1::1", 80, "[2606:2800:220:1::1]", "/k")


def test_redaction_drops_userinfo_query_and_fragment():
    shown = urlguard.redact("https://alice:s3cret@images.example.com:8443/v/vmlinux?X-Amz-Signature=abc#x")
    assert shown == "https://images.example.com:8443/v/vmlinux"
    assert "s3cret" not in shown and "alice" not in shown and "abc" not in shown


def test_file_urls_are_refused_by_the_worker_itself(tmp_path):
    with pytest.raises(images.ImageRefused) as err:
        images.fetch("file:///etc/hostname", "0" * 64, tmp_path / "cache", field="spec.image.kernel.url")
    assert err.value.reason == "InvalidSpec"
    assert str(err.value).startswith("spec.image.kernel.url: ")
    assert not (tmp_path / "cache").exists()


def test_a_refused_host_is_refused_before_any_connection_and_says_only_that(tmp_path, monkeypatch):
    def no_connection(*a, **kw):
        raise AssertionError("no connection may be attempted")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setattr(socket.socket, "connect", no_connection)
    with pytest.raises(images.ImageRefused) as err:
        images.fetch("http://user:pw@2130706433:8080/vmlinux?sig=1", "0" * 64, tmp_path / "cache",
                     field="spec.image.kernel.url")
    assert str(err.value) == "spec.image.kernel.url: the URL's host is not allowed"


def test_the_checksum_mismatch_message_carries_no_digest_and_nothing_is_cached(tmp_path, monkeypatch):
    # a stand-in for the network side (tested against real servers in tests/integration/test_image_sources.py)
    body = b"the bytes a URL answered with"

    def download(url, out, *args):
        out.write(body)
        return hashlib.sha256(body).hexdigest()

    monkeypatch.setattr(images, "_download", download)
    declared = hashlib.sha256(b"what the spec expects").hexdigest()
    with pytest.raises(images.ChecksumMismatch) as err:
        images.fetch("https://images.example.com/rootfs", declared, tmp_path / "cache", field="spec.image.rootfs.url")
    assert str(err.value) == "spec.image.rootfs.url: sha256 does not match"
    assert not re.search(r"[0-9a-fA-F]{16}", str(err.value))
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
