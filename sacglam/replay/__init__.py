"""The replay buffer as parts: storage layout, writer, sampler, hindsight relabelling, the native C path."""
