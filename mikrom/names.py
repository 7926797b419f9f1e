"""Names both sides agree on: API group, resources, annotations, task and queue names,
phases, condition types and reasons."""

from __future__ import annotations

import enum

GROUP = "mikrom.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

MICROVMS = "microvms"
MICROVMNODES = "microvmnodes"
IPPOOLS = "ippools"

FINALIZER = "mikrom.io/finalizer"
OPERATOR_STORAGE_PREFIX = "operator.mikrom.io"
"""The prefix of the annotations kopf keeps for the operator (its handlers' progress)."""
ANNOTATION_RESTARTED_AT = "mikrom.io/restartedAt"
ANNOTATION_FORCE_DELETE = "mikrom.io/force-delete"
LABEL_KVM = "mikrom.io/kvm"
FIELD_MANAGER_OPERATOR = "mikrom-operator"
FIELD_MANAGER_WORKER = "mikrom-worker"

# Task names are the original Mikrom guide's: VM tasks by their short names, beat tasks by
# their dotted ones (as the guide's beat_schedule spells them).
CREATE_VM = "create_vm_task"
DELETE_VM = "delete_vm_task"
STOP_VM = "stop_vm_task"
START_VM = "start_vm_task"
RESTART_VM = "restart_vm_task"
VM_TASKS = (CREATE_VM, DELETE_VM, STOP_VM, START_VM, RESTART_VM)

SYNC_VM_STATUS = "mikrom.worker.tasks.sync_vm_status"
CLEANUP_OLD_VMS = "mikrom.worker.tasks.cleanup_old_vms"
HEALTH_CHECK = "mikrom.worker.tasks.health_check"
GENERATE_REPORT = "mikrom.worker.tasks.generate_report"

DEFAULT_QUEUE = "mikrom"
BROADCAST_QUEUE = "mikrom.broadcast"
NODE_QUEUE_PREFIX = "mikrom.node."


def node_queue(node: str) -> str:
    """The queue only `node`'s worker consumes."""
    return NODE_QUEUE_PREFIX + node


class Intent(str, enum.Enum):
    """What the operator wants the node to do; the task name says the same, the worker re-reads
    the object to decide how."""

    CREATE = "create"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    DELETE = "delete"


INTENT_TASK = {
    Intent.CREATE: CREATE_VM,
    Intent.START: START_VM,
    Intent.STOP: STOP_VM,
    Intent.RESTART: RESTART_VM,
    Intent.DELETE: DELETE_VM,
}


class Phase(str, enum.Enum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    PROVISIONING = "Provisioning"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"
    DELETING = "Deleting"


class RunStrategy(str, enum.Enum):
    ALWAYS = "Always"
    RERUN_ON_FAILURE = "RerunOnFailure"
    ONCE = "Once"
    HALTED = "Halted"


class VMM(str, enum.Enum):
    FIRECRACKER = "firecracker"
    QEMU = "qemu"


# condition types
SCHEDULED = "Scheduled"
READY = "Ready"
RESTART_REQUIRED = "RestartRequired"
NODE_REACHABLE = "NodeReachable"

# reasons (CamelCase, used in conditions and events)
INVALID_SPEC = "InvalidSpec"
UNSCHEDULABLE = "Unschedulable"
PLACED = "Placed"
DISPATCHED = "Dispatched"
DISPATCH_FAILED = "DispatchFailed"
NO_PROGRESS = "NoProgress"
NODE_LOST = "NodeLost"
NODE_RECOVERED = "NodeRecovered"
RESCHEDULING = "Rescheduling"
FORCE_DELETED = "ForceDeleted"
IMAGE_DOWNLOAD_FAILED = "ImageDownloadFailed"
CHECKSUM_MISMATCH = "ChecksumMismatch"
BOOT_FAILED = "BootFailed"
BOOT_TIMEOUT = "BootTimeout"
VMM_EXITED = "VMMExited"
SHAPE_CHANGED = "ShapeChanged"
