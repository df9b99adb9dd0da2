"""eep_controller.planner"""
