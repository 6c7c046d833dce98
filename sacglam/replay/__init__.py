"""The replay buffer as parts: options (``config``), storage layout (``storage``), goal table (``goals``), writer
(``writer``), sampler (``sampler``), hindsight relabelling (``her``), rarity marks (``rarity``), achieved goals set
after the episode (``achieved``), the native C path (``native``, built by ``clib``) and the ``ReplayBuffer`` facade
(``buffer``). Nothing is re-exported here: ``import sacglam.replay.config`` must not load torch."""
