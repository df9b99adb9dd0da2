"""The reference MoE worker runtime (torch): what a worker process holds and does.

- ``worker``: the process (control pipe, serving thread, operation thread)
- ``commands``: the control channel's messages
- ``groups``: stateless process groups over a TCPStore rendezvous (gloo / nccl / hccl)
- ``expert_store``: slots of expert weights, staged slots, the forward pass
- ``moves``: a plan's transfer rows as one rank's sends, receives and reloads (numpy only)
- ``transfer``: executing those moves round by round with verified point-to-point messages
- ``checksum``: the transfer checksum
- ``checkpoint``: filling slots from the on-disk checkpoint
"""
