"""xmig.service: the daemons: the destination agent (agentd), the reference guest's host
(hostd), the QEMU source (qemusource), and their control-socket protocol (hostctl).
"""
