"""docs/architecture.svg is rendered from docs/architecture.dot (`make docs`): re-rendering the source
gives the same nodes, edges, clusters and text (coordinates may differ between Graphviz versions),
the diagram names the parts the architecture page describes, and the page embeds it."""

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
SVG = "{http://www.w3.org/2000/svg}"


def _structure(svg: str) -> dict[str, set[str]]:
    root = ET.fromstring(svg)
    out: dict[str, set[str]] = {"node": set(), "edge": set(), "cluster": set(), "text": set()}
    for group in root.iter(f"{SVG}g"):
        kind = group.get("class")
        if kind in ("node", "edge", "cluster"):
            out[kind].add(group.findtext(f"{SVG}title"))
    out["text"] = {" ".join(t.itertext()).strip() for t in root.iter(f"{SVG}text")}
    return out


def _render() -> str:
    dot = shutil.which("dot")
    assert dot, "Graphviz `dot` is missing: run `bash hack/system-deps.sh` (make test does)"
    result = subprocess.run([dot, "-Tsvg", str(DOCS / "architecture.dot")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_checked_in_svg_matches_a_fresh_render_of_the_dot_source():
    fresh, checked_in = _structure(_render()), _structure((DOCS / "architecture.svg").read_text())
    for kind in fresh:
        assert fresh[kind] == checked_in[kind], (
            f"docs/architecture.svg is out of date with docs/architecture.dot ({kind}s differ: "
            f"{sorted(fresh[kind] ^ checked_in[kind])}); run `make docs`")


def test_the_diagram_shows_every_part_and_the_paths_between_them():
    s = _structure((DOCS / "architecture.svg").read_text())
    text = " ".join(s["text"])
    for part in ("MicroVM", "MicroVMNode", "IPPool", "kopf", "decide", "one status write", "Celery message",
                 "mikrom.node.<node>", "mikrom", "mikrom.broadcast", "gevent", "supervisor", "host cgroup",
                 "QEMU", "Firecracker", "bridge + taps + nftables", "image cache", "sync_vm_status",
                 "cleanup_old_vms", "health_check", "generate_report", "Flower", "Ingress", "Prometheus"):
        assert part in text, part
    edges = s["edge"]
    for edge in ("user->microvm", "microvm->handlers", "handlers->decide", "decide->send",
                 "send->statuswrite", "microvm->statuswrite", "send->q_node", "q_node->worker",
                 "q_broadcast->worker", "q_default->worker", "beat->q_broadcast", "worker->supervisor",
                 "supervisor->vmm", "microvm->worker", "microvmnode->worker", "ingress->flower",
                 "prometheus->worker"):
        assert edge in edges, edge


def test_the_architecture_page_embeds_the_rendered_svg():
    page = (DOCS / "architecture.md").read_text()
    assert re.search(r"!\[[^\]]+\]\(architecture\.svg\)", page)
