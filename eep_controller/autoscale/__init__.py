"""eep_controller.autoscale"""
