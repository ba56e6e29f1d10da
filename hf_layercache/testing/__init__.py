"""Conformance suites that third-party backends and policies can run on themselves.

``hf_layercache.testing.backends`` checks a backend class, ``hf_layercache.testing.policies`` a policy class; the
project's own tests run them over every registered name.
"""
