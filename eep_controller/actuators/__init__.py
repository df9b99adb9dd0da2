"""How a plan reaches the serving side: eep's native agents (and, later, vLLM's HTTP API)."""

from eep_controller.actuators.base import Actuator
from eep_controller.actuators.native import NativeActuator

__all__ = ["Actuator", "NativeActuator"]
