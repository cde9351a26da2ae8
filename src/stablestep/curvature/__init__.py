"""stablestep.curvature"""
