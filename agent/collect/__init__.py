"""Sources of what the agent reports: sockets, kernel events, DNS answers."""
