"""eep_controller.operations"""
