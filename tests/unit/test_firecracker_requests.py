"""The Firecracker driver's API requests conform to Firecracker's own API specification, and the
driver's HTTP-over-unix-socket client sends exactly those requests."""

from __future__ import annotations

import http.server
import json
import socketserver
import threading

import jsonschema
import pytest
from harness.firecracker_api import load_api, validate_request
from mikrom.worker.vmm import VMSpec, build_requests
from mikrom.worker.vmm.firecracker import FirecrackerAPIError, FirecrackerDriver, send_requests

@pytest.fixture(scope="module")
def api():
    return load_api()


def full_spec(tmp_path) -> VMSpec:
    return VMSpec(uid="0b7a4c2e-9d3f-4a51-8c60-2f4d7e1b9a33", name="web-1", vcpus=2, memory_mib=256,
                  kernel="/var/lib/mikrom/images/vmlinux", initrd="/var/lib/mikrom/images/initrd.img",
                  rootfs=str(tmp_path / "rootfs.img"), kernel_args="console=ttyS0 reboot=k panic=1 ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off",
                  tap="mk0123456789ab", mac="02:11:22:33:44:55", state_dir=tmp_path)


def minimal_spec(tmp_path) -> VMSpec:
    return VMSpec(uid="u1", name="tiny", vcpus=1, memory_mib=128, kernel="/k", state_dir=tmp_path)


@pytest.mark.parametrize("make", [full_spec, minimal_spec])
def test_every_request_exists_in_the_spec_and_its_body_validates(api, tmp_path, make):
    requests = build_requests(make(tmp_path))
    for method, path, body in requests:
        validate_request(api, method, path, body)
    assert requests[-1] == ("PUT", "/actions", {"action_type": "InstanceStart"})


def test_full_spec_configures_kernel_machine_drive_and_network(tmp_path):
    spec = full_spec(tmp_path)
    by_path = {path: body for _, path, body in build_requests(spec)}
    assert list(by_path) == ["/boot-source", "/machine-config", "/drives/rootfs", "/network-interfaces/eth0", "/actions"]
    assert by_path["/boot-source"]["kernel_image_path"] == spec.kernel
    assert by_path["/boot-source"]["initrd_path"] == spec.initrd
    args = by_path["/boot-source"]["boot_args"].split()
    assert "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off" in args
    assert args.count("console=ttyS0") == 1 and "panic=1" in args
    assert by_path["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 256, "smt": False}
    assert by_path["/drives/rootfs"]["path_on_host"] == spec.rootfs
    assert by_path["/drives/rootfs"]["is_root_device"] is True
    assert by_path["/network-interfaces/eth0"] == {"iface_id": "eth0", "host_dev_name": spec.tap, "guest_mac": spec.mac}


def test_the_validator_catches_unknown_and_missing_fields(api):
    with pytest.raises(jsonschema.ValidationError):
        validate_request(api, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "vcpus": 1})
    with pytest.raises(jsonschema.ValidationError):
        validate_request(api, "PUT", "/boot-source", {"boot_args": "x"})
    with pytest.raises(jsonschema.ValidationError):
        validate_request(api, "PUT", "/actions", {"action_type": "Reboot"})
    with pytest.raises(AssertionError):
        validate_request(api, "PUT", "/no-such-endpoint", {})


class _Recorder(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def fake_api(tmp_path):
    """A small HTTP/1.1 server on a unix socket that records requests and answers 204
    (or 400 with a Firecracker-style fault message for paths listed in `fail`)."""
    sock = tmp_path / "fc.sock"
    state = {"requests": [], "fail": set()}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self):
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length) if length else b""
            state["requests"].append({"method": "PUT", "path": self.path, "headers": dict(self.headers),
                                      "body": json.loads(raw) if raw else None})
            if self.path in state["fail"]:
                payload = json.dumps({"fault_message": "Invalid request"}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            else:
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def address_string(self):
            return "unix"

        def log_message(self, *args):
            pass

    server = _Recorder(str(sock), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state["sock"] = sock
    yield state
    server.shutdown()
    server.server_close()


def test_the_driver_client_sends_exactly_the_built_requests(api, fake_api, tmp_path):
    requests = build_requests(full_spec(tmp_path))
    send_requests(fake_api["sock"], requests, timeout=5)
    wire = [(r["method"], r["path"], r["body"]) for r in fake_api["requests"]]
    assert wire == requests
    for method, path, body in wire:
        validate_request(api, method, path, body)
    for r in fake_api["requests"]:
        assert r["headers"]["Content-Type"] == "application/json"


def test_a_refused_request_stops_the_sequence_with_firecrackers_message(fake_api, tmp_path):
    fake_api["fail"].add("/machine-config")
    with pytest.raises(FirecrackerAPIError, match="Invalid request") as err:
        send_requests(fake_api["sock"], build_requests(full_spec(tmp_path)), timeout=5)
    assert err.value.reason == "VMMStartFailed"
    assert [r["path"] for r in fake_api["requests"]] == ["/boot-source", "/machine-config"]


def test_graceful_stop_sends_ctrl_alt_del_over_the_api_socket(api, fake_api, tmp_path):
    driver = FirecrackerDriver()
    spec = full_spec(tmp_path)
    (tmp_path / "vm.json").write_text(json.dumps({"driver": "firecracker", "spec": spec.to_dict()}))
    assert driver.api_socket(spec) == fake_api["sock"]
    driver._graceful_stop(tmp_path, timeout=5)
    [req] = fake_api["requests"]
    assert (req["method"], req["path"], req["body"]) == ("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    validate_request(api, req["method"], req["path"], req["body"])


def test_the_client_times_out_instead_of_hanging_on_a_silent_socket(tmp_path):
    import socket

    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        with pytest.raises(TimeoutError):
            send_requests(path, [("PUT", "/actions", {"action_type": "InstanceStart"})], timeout=0.3)
    finally:
        listener.close()


def test_jailed_requests_use_paths_inside_the_chroot(api, tmp_path):
    from mikrom.worker.vmm import JailerConfig

    driver = FirecrackerDriver(jailer=JailerConfig(chroot_base=str(tmp_path / "jail")))
    spec = full_spec(tmp_path)
    jailed = build_requests(driver._jailed_spec(spec))
    by_path = {path: body for _, path, body in jailed}
    assert by_path["/boot-source"]["kernel_image_path"] == "/kernel"
    assert by_path["/boot-source"]["initrd_path"] == "/initrd"
    assert by_path["/drives/rootfs"]["path_on_host"] == "/rootfs"
    for method, path, body in jailed:
        validate_request(api, method, path, body)
    argv = driver.command(spec)
    assert argv[:3] == ["jailer", "--id", spec.uid]
    assert argv[argv.index("--cgroup-version") + 1] == "2"
    assert argv[-3:] == ["--", "--api-sock", "/run/firecracker.socket"]
