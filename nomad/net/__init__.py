"""Network layer for nomad, one job per module: the SSRF guard (``guard``), fetch errors (``errors``),
request encoding (``request``), the redirect policy (``redirects``), the checked exchange with
streaming caps and deadlines (``transport``), per-host limits (``limits``) and the deadline watchdog.

``nomad.http`` is the public entry point (the client facade and its retry policy).
"""
