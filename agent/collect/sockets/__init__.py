"""The socket tables: what each network namespace's sockets are at one moment.

``procnet`` decodes ``/proc/PID/net/{tcp,tcp6,udp,udp6}``; ``sockdiag`` reads the same tables
through netlink ``sock_diag``, filtered in the kernel; ``changes`` tells from a namespace's
counters whether its tables can have changed since the last read; ``outbound`` counts outbound
connections for coverage; ``sampler`` is the Linux sampler (one sample: the steps in order);
``psutil_backend`` gives the same records through psutil, for other platforms.
"""
