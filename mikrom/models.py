"""Typed API models: the single source of the CRD schemas (see `mikrom.crdgen`), of cross-field
validation and of the task payload.

Field names are the API's camelCase. `x_validations` on a model or field becomes CEL rules
(`x-kubernetes-validations`) in the CRD, so the API server enforces them.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from .names import Intent, Phase, RunStrategy, VMM

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SHA256 = r"^[a-f0-9]{64}$"
IPV4_CIDR = r"^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]|[12][0-9]|3[0-2])$"


def cel(rule: str, message: str, reason: str | None = None, field_path: str | None = None) -> dict:
    out = {"rule": rule, "message": message}
    if reason:
        out["reason"] = reason
    if field_path:
        out["fieldPath"] = field_path
    return out


def immutable(field: str) -> dict:
    return cel("self == oldSelf", f"{field} is immutable")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_enum_values=True)


class Condition(Model):
    type: str = Field(description="Condition type, e.g. Scheduled, Ready, RestartRequired, NodeReachable.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason for the last transition.")
    message: str = Field("", description="Human-readable details.")
    lastTransitionTime: Optional[str] = Field(None, description="When the status last changed (RFC 3339).")
    observedGeneration: Optional[int] = Field(None, description="metadata.generation the condition was computed from.")


# --------------------------------------------------------------------------------- MicroVM

class ImageSource(Model):
    url: Optional[str] = Field(None, pattern=r"^https?://\S+$", max_length=2048,
                               description="An http:// or https:// URL to download the file from; requires sha256. "
                                           "Hosts on loopback, link-local or private addresses are refused unless "
                                           "the node allows their range.")
    sha256: Optional[str] = Field(None, pattern=SHA256, description="Hex SHA-256 digest the download must match.")
    path: Optional[str] = Field(None, min_length=1, max_length=255,
                                description="A file relative to the node's image directory (no absolute paths, no '..').",
                                json_schema_extra={"x_validations": [
                                    cel("!self.startsWith('/')", "must be relative to the node's image directory"),
                                    cel("!self.matches('(^|/)\\\\.\\\\.(/|$)')", "must not contain '..'"),
                                ]})
    model_config = ConfigDict(json_schema_extra={"x_validations": [
        cel("has(self.url) != has(self.path)", "exactly one of url or path must be set"),
        cel("!has(self.url) || has(self.sha256)", "url requires sha256", field_path=".sha256"),
    ]})


class ImageSpec(Model):
    kernel: ImageSource = Field(description="The guest kernel (uncompressed vmlinux for Firecracker; bzImage works with QEMU).")
    rootfs: Optional[ImageSource] = Field(None, description="The root filesystem image; each VM boots its own copy.")
    initrd: Optional[ImageSource] = Field(None, description="An initial ramdisk.")
    kernelArgs: str = Field("console=ttyS0 reboot=k panic=1", max_length=4096,
                            description="Kernel command line; the guest address is appended by the node.")
    model_config = ConfigDict(json_schema_extra={"x_validations": [
        cel("has(self.rootfs) || has(self.initrd)", "one of rootfs or initrd is required"),
    ]})


class NetworkSpec(Model):
    pool: str = Field("default", pattern=DNS_SUBDOMAIN, max_length=253, description="Name of the IPPool to take the address from.")


class MicroVMSpec(Model):
    vcpus: int = Field(1, ge=1, le=32, description="Virtual CPUs.")
    memoryMiB: int = Field(512, ge=128, le=65536, description="Guest memory in MiB.")
    runStrategy: RunStrategy = Field(RunStrategy.ALWAYS, description="Always, RerunOnFailure, Once or Halted (stopped).")
    image: ImageSpec = Field(description="Kernel, root filesystem and kernel command line.")
    vmm: Optional[VMM] = Field(None, description="firecracker or qemu; default: the node's default VMM.")
    network: Optional[NetworkSpec] = Field(None, description="Network attachment; omit for no network.",
                                           json_schema_extra={"x_validations": [immutable("spec.network")]})
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Labels a MicroVMNode must have.")
    nodeName: Optional[str] = Field(None, pattern=DNS_SUBDOMAIN, max_length=253,
                                    description="Pin to one MicroVMNode.",
                                    json_schema_extra={"x_validations": [immutable("spec.nodeName")]})
    ttlSecondsAfterFinished: Optional[int] = Field(None, ge=0, description="Delete the MicroVM this long after it Succeeded or Failed.")
    model_config = ConfigDict(json_schema_extra={"x_validations": [
        cel("has(self.nodeName) == has(oldSelf.nodeName)", "spec.nodeName cannot be added or removed", field_path=".nodeName"),
        cel("has(self.network) == has(oldSelf.network)", "spec.network cannot be added or removed", field_path=".network"),
    ]})


class Shape(Model):
    vcpus: int = Field(description="Virtual CPUs of the running VM.")
    memoryMiB: int = Field(description="Memory of the running VM in MiB.")


class Dispatch(Model):
    intent: Intent = Field(description="The last intent sent to the node.")
    attempts: int = Field(1, description="How many times this intent has been sent.")
    sentAt: str = Field(description="When it was last sent (RFC 3339).")
    taskId: Optional[str] = Field(None, description="Celery task id of the last message.")
    key: str = Field("", description="What the intent was computed from, so a new one is told from a repeat.")


class MicroVMStatus(Model):
    phase: Optional[Phase] = Field(None, description="Pending, Scheduled, Provisioning, Running, Stopping, Stopped, Succeeded, Failed, Unknown or Deleting.")
    node: Optional[str] = Field(None, description="The MicroVMNode the VM is assigned to; set once, by the operator.")
    ipAddress: Optional[str] = Field(None, description="Guest IPv4 address.")
    macAddress: Optional[str] = Field(None, description="Guest MAC address.")
    vmm: Optional[str] = Field(None, description="The VMM running the VM.")
    pid: Optional[int] = Field(None, description="VMM process id on the node.")
    observedGeneration: Optional[int] = Field(None, description="The spec generation the worker last acted on.")
    startedAt: Optional[str] = Field(None, description="When the VM last started (RFC 3339).")
    bootSeconds: Optional[float] = Field(None, description="Seconds from VMM start to the guest's ready signal.")
    activeShape: Optional[Shape] = Field(None, description="The shape the running VM was started with.")
    restartedAt: Optional[str] = Field(None, description="The mikrom.io/restartedAt value the worker last acted on.")
    finishedAt: Optional[str] = Field(None, description="When the VM reached Succeeded or Failed.")
    cleanedUpAt: Optional[str] = Field(None, description="Set by the worker when the VM, its tap and its files are gone.")
    dispatch: Optional[Dispatch] = Field(None, description="The operator's last message to the node.")
    conditions: list[Condition] = Field(default_factory=list, description="Scheduled, Ready, RestartRequired, NodeReachable.",
                                        json_schema_extra={"x_list_map_keys": ["type"]})
    message: Optional[str] = Field(None, description="Human-readable last error or state.")
    reason: Optional[str] = Field(None, description="CamelCase reason of the last error or state.")


class MicroVM(Model):
    apiVersion: str = Field(description="mikrom.io/v1alpha1")
    kind: str = Field(description="MicroVM")
    metadata: dict = Field(default_factory=dict, description="Standard object metadata.")
    spec: MicroVMSpec = Field(description="The desired VM.")
    status: Optional[MicroVMStatus] = Field(None, description="The observed VM.")


# --------------------------------------------------------------------------------- MicroVMNode

class Resources(Model):
    vcpus: int = Field(0, ge=0, description="Virtual CPUs.")
    memoryMiB: int = Field(0, ge=0, description="Memory in MiB.")


class MicroVMNodeSpec(Model):
    schedulable: bool = Field(True, description="False cordons the node: no new VMs are placed on it.")
    cidr: Optional[str] = Field(None, pattern=IPV4_CIDR, max_length=18, description="The node's address block, carved from an IPPool by the operator.",
                                json_schema_extra={"x_validations": [immutable("spec.cidr")]})
    pool: Optional[str] = Field(None, description="The IPPool the block comes from.")


class Usage(Model):
    vcpus: str = Field("", description="vCPUs used/total, for kubectl.")
    memoryMiB: str = Field("", description="Memory MiB used/total, for kubectl.")


class MicroVMNodeStatus(Model):
    capacity: Optional[Resources] = Field(None, description="What the node offers to VMs.")
    allocated: Optional[Resources] = Field(None, description="What VMs assigned to the node hold.")
    usage: Optional[Usage] = Field(None, description="Allocated over capacity as text.")
    vmCount: int = Field(0, description="VMs assigned to the node.")
    vmms: list[str] = Field(default_factory=list, description="VMMs available on the node.")
    defaultVmm: Optional[str] = Field(None, description="The VMM used when a MicroVM names none.")
    kvm: bool = Field(False, description="Whether KVM is usable on the node.")
    lastHeartbeatTime: Optional[str] = Field(None, description="The worker's last heartbeat (RFC 3339).")
    workerVersion: Optional[str] = Field(None, description="Version of the node's worker.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready.",
                                        json_schema_extra={"x_list_map_keys": ["type"]})


class MicroVMNode(Model):
    apiVersion: str = Field(description="mikrom.io/v1alpha1")
    kind: str = Field(description="MicroVMNode")
    metadata: dict = Field(default_factory=dict, description="Standard object metadata.")
    spec: MicroVMNodeSpec = Field(default_factory=MicroVMNodeSpec, description="The node's settings.")
    status: Optional[MicroVMNodeStatus] = Field(None, description="What the worker reports.")


# --------------------------------------------------------------------------------- IPPool

class IPPoolSpec(Model):
    cidr: str = Field(pattern=IPV4_CIDR, max_length=18, description="The pool's address range.",
                      json_schema_extra={"x_validations": [immutable("spec.cidr")]})
    blockSize: int = Field(26, ge=16, le=30, description="Prefix length of each node's block.",
                           json_schema_extra={"x_validations": [immutable("spec.blockSize")]})


class IPPoolStatus(Model):
    blocks: dict[str, str] = Field(default_factory=dict, description="Node name to block CIDR.")
    blockCount: int = Field(0, description="Blocks carved.")
    allocated: int = Field(0, description="Addresses held by VMs.")
    available: int = Field(0, description="Guest addresses not yet allocated (in carved and uncarved blocks).")
    message: Optional[str] = Field(None, description="Last problem, e.g. the pool is exhausted.")


class IPPool(Model):
    apiVersion: str = Field(description="mikrom.io/v1alpha1")
    kind: str = Field(description="IPPool")
    metadata: dict = Field(default_factory=dict, description="Standard object metadata.")
    spec: IPPoolSpec = Field(description="The pool's range and block size.")
    status: Optional[IPPoolStatus] = Field(None, description="Blocks and counts.")


# --------------------------------------------------------------------------------- tasks

class VMRef(Model):
    """The whole body of a VM task: a reference, never a spec (DESIGN.md section 2)."""

    namespace: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]
    name: Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)]
    uid: Annotated[str, Field(min_length=1, max_length=64)]
    intent: Intent = Intent.CREATE
