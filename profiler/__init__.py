"""autoplan.profiler: measurement only, of layers and collectives on the machine at hand.

measure.py times and weighs each distinct layer alone (compute.py, memory.py), in_situ.py
times them in a world of local ranks, comm.py measures collectives and fits them. The
Profile they fill is a ground-floor format (autoplan/profile.py); the datasheet figures and
formulas that stand in for a measurement live in autoplan/hardware.py and cost_model/.
"""
