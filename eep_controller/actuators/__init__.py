"""eep_controller.actuators"""
