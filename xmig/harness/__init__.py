"""xmig.harness: whole migrations on one machine over an emulated WAN (localrun,
qemurun), the demo, plots.
"""
