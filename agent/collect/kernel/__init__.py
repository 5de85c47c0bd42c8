"""Kernel events (``docs/EVENTS.md``): every connect, accept, close and UDP flow as it happens.

``tracefs`` owns the agent's tracing instance; ``ringbuffer`` decodes the binary per-CPU
buffers; ``records`` holds the typed events and their decoders; ``reader`` chooses the events
this kernel has and reads them; ``tracker`` keeps the process table and the socket state
machines; ``listeners`` finds the owner of an accepted connection; ``source`` is the
``KernelEventSource`` the pipeline polls.
"""
