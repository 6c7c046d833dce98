"""Discrete soft actor-critic over candidate sets, with hindsight relabelling and a hindsight supervised term."""
