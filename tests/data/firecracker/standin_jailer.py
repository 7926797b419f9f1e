"""A stand-in for Firecracker's `jailer` plus a jailed Firecracker, for the unit tier.

What it leaves out: no chroot, pivot_root, mknod, seccomp, cgroup or KVM, and no guest. What it
does for real: it parses the jailer's documented command line (an unknown flag fails as it would),
builds the chroot directory as the jailer does (creates `<base>/<exec name>/<id>/root`, chowns it
to the jail's uid:gid), works from inside it, drops to that uid:gid, binds the API socket inside the chroot and answers
Firecracker's API: every file a request names is opened the way Firecracker would open it, as the
unprivileged uid, relative to the chroot, and refused with a Firecracker-style fault if that
fails. `InstanceStart` prints the ready marker on the console; `SendCtrlAltDel` ends the process.

It records its command line, the requests it served and every file it opened (path inside the
jail, inode, whether writable) in `<base>/<exec name>/<id>/standin.json`.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import socketserver
import sys
import traceback  # noqa: F401 - socketserver's error report imports it lazily, after the uid drop

READY_MARKER = "MIKROM-READY"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jailer", allow_abbrev=False)
    p.add_argument("--id", required=True)
    p.add_argument("--exec-file", required=True)
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--parent-cgroup")
    p.add_argument("--cgroup-version", choices=["1", "2"], default="1")
    p.add_argument("--cgroup", action="append", default=[])
    p.add_argument("--chroot-base-dir", default="/srv/jailer")
    p.add_argument("--netns")
    p.add_argument("--resource-limit", action="append", default=[])
    p.add_argument("--daemonize", action="store_true")
    p.add_argument("--new-pid-ns", action="store_true")
    if "--" in argv:
        split = argv.index("--")
        ours, firecracker = argv[:split], argv[split + 1:]
    else:
        ours, firecracker = argv, []
    args = p.parse_args(ours)
    fc = argparse.ArgumentParser(prog="firecracker", allow_abbrev=False)
    fc.add_argument("--api-sock", default="/run/firecracker.socket")
    fc.add_argument("--id")
    args.firecracker = fc.parse_args(firecracker)
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", args.id):
        p.error(f"invalid id {args.id!r}")
    if "firecracker" not in os.path.basename(args.exec_file):
        p.error("the exec file name must include 'firecracker'")
    for item in args.cgroup:
        if "=" not in item:
            p.error(f"--cgroup {item!r} is not <file>=<value>")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    jail = os.path.join(args.chroot_base_dir, os.path.basename(args.exec_file), args.id)
    root = os.path.join(jail, "root")
    os.makedirs(root, exist_ok=True)
    os.chown(root, args.uid, args.gid)
    record = {"argv": argv, "uid": args.uid, "gid": args.gid, "cgroup": args.cgroup, "requests": [],
              "opened": []}
    record_path = os.path.join(jail, "standin.json")

    # Opened while still root: the jail directory is not the unprivileged uid's to write.
    record_fd = os.open(record_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def save():
        data = json.dumps(record).encode()
        os.ftruncate(record_fd, 0)
        os.pwrite(record_fd, data, 0)

    save()
    # The real jailer pivots into the chroot; working from inside it, with relative paths, gives
    # the unprivileged uid the same view without needing to traverse the directories above.
    os.chdir(root)
    os.setgroups([])
    os.setgid(args.gid)
    os.setuid(args.uid)

    def inside(path: str) -> str:
        return path.lstrip("/") or "."

    def check_files(path: str, body: dict) -> str | None:
        wanted = []
        if path == "/boot-source":
            wanted += [(body.get("kernel_image_path"), os.O_RDONLY), (body.get("initrd_path"), os.O_RDONLY)]
        elif path.startswith("/drives/"):
            wanted.append((body.get("path_on_host"), os.O_RDONLY if body.get("is_read_only") else os.O_RDWR))
        for name, flags in wanted:
            if not name:
                continue
            if not name.startswith("/"):
                return f"{name}: paths inside the jail are absolute"
            try:
                fd = os.open(inside(name), flags)
            except OSError as exc:
                return f"Cannot open {name}: {exc.strerror}"
            record["opened"].append({"path": name, "ino": os.fstat(fd).st_ino, "writable": flags == os.O_RDWR})
            os.close(fd)
            save()
        return None

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.loads(raw) if raw else None
            record["requests"].append({"method": "PUT", "path": self.path, "body": body})
            save()
            fault = check_files(self.path, body or {})
            if fault:
                self._answer(400, {"fault_message": fault})
                return
            self._answer(204)
            if self.path == "/actions" and body.get("action_type") == "InstanceStart":
                print(READY_MARKER, flush=True)
            elif self.path == "/actions" and body.get("action_type") == "SendCtrlAltDel":
                print("reboot: Restarting system", flush=True)
                os._exit(0)

        def _answer(self, code: int, payload: dict | None = None):
            data = json.dumps(payload).encode() if payload else b""
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            if data:
                self.send_header("Content-Type", "application/json")
            self.end_headers()
            if data:  # an empty write after the client read a 204 and hung up would be EPIPE
                self.wfile.write(data)

        def address_string(self):
            return "api"

        def log_message(self, *args):
            pass

    class Server(socketserver.UnixStreamServer):
        pass

    print(f"jailed firecracker {args.id} running as {os.getuid()}:{os.getgid()}", flush=True)
    Server(inside(args.firecracker.api_sock), Handler).serve_forever(poll_interval=0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
