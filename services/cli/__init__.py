"""The ``skillgate`` console command: runs any service, the whole local stack, and operator tools."""
