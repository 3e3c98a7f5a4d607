"""Instance states and how they combine into the public ``status``.

The values and the derivation follow OpenStack Nova: ``vm_state`` is the stable
state, ``task_state`` the operation in progress, and ``status`` is what users see,
computed from the two.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    BUILD = "BUILD"
    ACTIVE = "ACTIVE"
    SHUTOFF = "SHUTOFF"
    REBOOT = "REBOOT"
    HARD_REBOOT = "HARD_REBOOT"
    RESIZE = "RESIZE"
    VERIFY_RESIZE = "VERIFY_RESIZE"
    ERROR = "ERROR"
    DELETED = "DELETED"


class VmState(StrEnum):
    BUILDING = "BUILDING"
    ACTIVE = "ACTIVE"
    STOPPED = "STOPPED"
    RESIZED = "RESIZED"
    ERROR = "ERROR"
    DELETED = "DELETED"


class PowerState(StrEnum):
    NOSTATE = "NOSTATE"
    RUNNING = "RUNNING"
    SHUTDOWN = "SHUTDOWN"
    CRASHED = "CRASHED"


class TaskState(StrEnum):
    SCHEDULING = "SCHEDULING"
    BLOCK_DEVICE_MAPPING = "BLOCK_DEVICE_MAPPING"
    NETWORKING = "NETWORKING"
    SPAWNING = "SPAWNING"
    POWERING_OFF = "POWERING_OFF"
    POWERING_ON = "POWERING_ON"
    REBOOTING = "REBOOTING"
    REBOOTING_HARD = "REBOOTING_HARD"
    RESIZE_PREP = "RESIZE_PREP"
    RESIZE_MIGRATING = "RESIZE_MIGRATING"
    RESIZE_FINISH = "RESIZE_FINISH"
    DELETING = "DELETING"


_RESIZE_TASKS = {TaskState.RESIZE_PREP, TaskState.RESIZE_MIGRATING, TaskState.RESIZE_FINISH}

# Status of each vm_state when no task changes it.
_DEFAULT_STATUS: dict[VmState, Status] = {
    VmState.BUILDING: Status.BUILD,
    VmState.ACTIVE: Status.ACTIVE,
    VmState.STOPPED: Status.SHUTOFF,
    VmState.RESIZED: Status.VERIFY_RESIZE,
    VmState.ERROR: Status.ERROR,
    VmState.DELETED: Status.DELETED,
}

# (vm_state, task_state) pairs whose status differs from the vm_state's default.
_TASK_STATUS: dict[tuple[VmState, TaskState], Status] = {
    (VmState.ACTIVE, TaskState.REBOOTING): Status.REBOOT,
    (VmState.ACTIVE, TaskState.REBOOTING_HARD): Status.HARD_REBOOT,
    **{(VmState.ACTIVE, task): Status.RESIZE for task in _RESIZE_TASKS},
    **{(VmState.STOPPED, task): Status.RESIZE for task in _RESIZE_TASKS},
}


def derive_status(vm_state: VmState | str, task_state: TaskState | str | None) -> Status:
    """Return the public status for a vm_state and task_state pair."""
    vm = VmState(vm_state)
    if task_state is not None:
        status = _TASK_STATUS.get((vm, TaskState(task_state)))
        if status is not None:
            return status
    return _DEFAULT_STATUS[vm]


# Create runs these task states in order; the instance is ACTIVE after the last.
CREATE_STEPS: tuple[TaskState, ...] = (
    TaskState.SCHEDULING,
    TaskState.BLOCK_DEVICE_MAPPING,
    TaskState.NETWORKING,
    TaskState.SPAWNING,
)
