"""xmig.protocol: what the two sides say and keep: the control messages, the commit
protocol's state machines and their execution, the journal.
"""
