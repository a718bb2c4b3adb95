"""Network safety layer for nomad: address policy (SSRF guard), errors, format sniffing.

``nomad.http`` is the public entry point; these modules hold its parts so each
has one job.
"""
