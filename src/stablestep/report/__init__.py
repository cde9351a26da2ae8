"""stablestep.report"""
