"""Where keys and values live: the backends behind one contract (``backends``), presses as a policy
over any backend (``press``), tree attention's slots (``tree``), and the part that owns a cache
(``part``); ``sampling.kvcache_model`` is the one wrapper over them."""
