"""Instance states and how they combine into the public ``status``.

The values and the derivation follow OpenStack Nova: ``vm_state`` is the stable
state, ``task_state`` the operation in progress, and ``status`` is what users see,
computed from the two.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

from mycloud_compute.services.errors import Conflict


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


# Resize runs these task states in order; the instance is RESIZED (status
# VERIFY_RESIZE) after the last, until the resize is confirmed or reverted.
RESIZE_STEPS: tuple[TaskState, ...] = (
    TaskState.RESIZE_PREP,
    TaskState.RESIZE_MIGRATING,
    TaskState.RESIZE_FINISH,
)


# --- instance actions ---------------------------------------------------------------


class Action(StrEnum):
    """The actions of ``POST /v1/instances/{id}/actions/{action}``."""

    START = "start"
    STOP = "stop"
    REBOOT = "reboot"
    RESIZE = "resize"
    CONFIRM_RESIZE = "confirm-resize"
    REVERT_RESIZE = "revert-resize"


class RebootType(StrEnum):
    SOFT = "SOFT"
    HARD = "HARD"


@dataclass(frozen=True)
class ActionRule:
    """The vm_states an action may start from, and the task_state it sets when accepted.

    Every action also needs task_state null, because one operation runs at a time. A
    ``task_state`` of None leaves task_state null while the action's task runs
    (confirm-resize and revert-resize, which have no task state of their own).
    ``needs_host`` is set for actions that work on the VM, which an instance whose
    build never got a host does not have.
    """

    vm_states: frozenset[VmState]
    task_state: TaskState | None
    needs_host: bool = True


def _states(*states: VmState) -> frozenset[VmState]:
    return frozenset(states)


_ACTIVE, _STOPPED, _RESIZED, _ERROR = VmState.ACTIVE, VmState.STOPPED, VmState.RESIZED, VmState.ERROR

# The vm_states each action may start from, as in OpenStack Nova's compute API: a
# soft reboot needs a running guest, while stop and a hard reboot also recover an
# instance in ERROR. Reboot has one row per reboot type; the other actions have none.
ACTION_RULES: dict[tuple[Action, RebootType | None], ActionRule] = {
    (Action.START, None):              ActionRule(_states(_STOPPED), TaskState.POWERING_ON),
    (Action.STOP, None):               ActionRule(_states(_ACTIVE, _ERROR), TaskState.POWERING_OFF),
    (Action.REBOOT, RebootType.SOFT):  ActionRule(_states(_ACTIVE), TaskState.REBOOTING),
    (Action.REBOOT, RebootType.HARD):  ActionRule(_states(_ACTIVE, _STOPPED, _ERROR), TaskState.REBOOTING_HARD),
    (Action.RESIZE, None):             ActionRule(_states(_ACTIVE, _STOPPED), TaskState.RESIZE_PREP),
    (Action.CONFIRM_RESIZE, None):     ActionRule(_states(_RESIZED), None),
    (Action.REVERT_RESIZE, None):      ActionRule(_states(_RESIZED), None),
}


class InstanceInvalidState(Conflict):
    """The instance's state does not allow the requested action."""


def action_label(action: Action, reboot_type: RebootType | None = None) -> str:
    """Name an action in messages: ``stop``, ``HARD reboot``."""
    return f"{reboot_type} reboot" if reboot_type else action.value


def check_action(
    action: Action,
    reboot_type: RebootType | None,
    *,
    instance_id: uuid.UUID,
    vm_state: str,
    task_state: str | None,
    has_host: bool,
) -> ActionRule:
    """Return the rule of the action, or raise InstanceInvalidState when the state forbids it."""
    rule = ACTION_RULES[(action, reboot_type)]
    label = action_label(action, reboot_type)
    status = derive_status(vm_state, task_state)
    details = {
        "action": label,
        "status": status.value,
        "vm_state": vm_state,
        "task_state": task_state,
    }
    if task_state is not None or VmState(vm_state) not in rule.vm_states:
        allowed = " or ".join(sorted(rule.vm_states))
        raise InstanceInvalidState(
            f"instance {instance_id} is {status} (vm_state {vm_state}, task_state "
            f"{task_state or 'null'}), but the {label} action needs vm_state {allowed} "
            "and no task in progress",
            details,
        )
    if rule.needs_host and not has_host:
        raise InstanceInvalidState(
            f"the {label} action needs a compute host, but instance {instance_id} has none "
            "because its build did not finish (delete the instance instead)",
            details,
        )
    return rule
