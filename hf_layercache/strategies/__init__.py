"""Strategies: what is cached and how it is reused, one package each (``exact``, ``prefix``, ``semantic``,
``attention``); :mod:`.base` is the contract, :mod:`.stack` the part of it for strategies that hook every layer of a
stack. The packages import nothing on import, so a strategy's torch-free ``config`` module can be read alone (the
command line's ``inspect`` does); ``import hf_layercache`` imports each ``strategy`` module, which registers it.
"""
