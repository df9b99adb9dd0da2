"""eep_controller.api"""
