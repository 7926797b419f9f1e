"""VMM drivers behind one small interface: QEMU `microvm` and Firecracker.

    driver = get_driver("qemu")                  # or "firecracker"
    pid = driver.start(spec)                     # detached; survives the worker
    seconds = driver.wait_ready(spec, timeout=60)
    driver.stop(spec.state_dir, timeout=30)      # graceful, then SIGKILL
    pid = running_pid(state_dir)                 # adoption after a worker restart
    restart_from_saved(state_dir)                # start again from the saved vm.json
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import (
    READY_MARKER,
    BootTimeout,
    Driver,
    StopFailed,
    VMMError,
    VMMExited,
    VMMStartFailed,
    VMSpec,
    console_tail,
    kvm_status,
    load_saved,
    running_pid,
)
from .firecracker import FirecrackerDriver, JailerConfig, build_requests
from .qemu import QemuDriver, kvm_usable
from .sandbox import SandboxConfig, SandboxUnavailable, VMIds, claim_ids

DRIVERS: dict[str, type[Driver]] = {"qemu": QemuDriver, "firecracker": FirecrackerDriver}


def get_driver(name: str, **config) -> Driver:
    """A driver by name (`qemu` or `firecracker`), with its settings as keyword arguments."""
    try:
        cls = DRIVERS[name]
    except KeyError:
        raise VMMError(f"unknown VMM {name!r}; known: {', '.join(sorted(DRIVERS))}") from None
    return cls(**config)


def available_drivers(configs: dict[str, dict] | None = None) -> list[str]:
    """Names of the drivers that can boot VMs on this host, each with its settings from `configs`."""
    configs = configs or {}
    return [name for name, cls in DRIVERS.items() if cls(**configs.get(name, {})).available()]


def spec_from_state(state_dir: str | os.PathLike) -> VMSpec:
    """The VMSpec saved in a state dir's vm.json."""
    return load_saved(state_dir)[2]


def driver_for_state(state_dir: str | os.PathLike) -> Driver:
    """The driver, with the settings it had, that started the VM of this state dir."""
    name, config, _ = load_saved(state_dir)
    return get_driver(name, **config)


def restart_from_saved(state_dir: str | os.PathLike) -> int:
    """Start the VM again from its saved vm.json (a new VMM process); returns its pid. A VM that
    is still running is left alone and its pid returned."""
    name, config, spec = load_saved(Path(state_dir))
    return get_driver(name, **config).start(spec)


__all__ = [
    "READY_MARKER", "BootTimeout", "Driver", "FirecrackerDriver", "JailerConfig", "QemuDriver",
    "SandboxConfig", "SandboxUnavailable", "StopFailed", "VMIds", "VMMError", "VMMExited", "VMMStartFailed",
    "VMSpec", "available_drivers", "build_requests", "claim_ids", "console_tail", "driver_for_state",
    "get_driver", "kvm_status", "kvm_usable", "load_saved", "restart_from_saved", "running_pid",
    "spec_from_state",
]
