"""Text environments, registered with gymnasium under the ``sacglam/`` namespace on import.

    import envs, gymnasium
    env = gymnasium.make("sacglam/PlaygroundText-v0", goal_categories=["grasp", "grow_plant"])

Entry points are strings, so importing this package loads no env backend (minigrid, textworld) until used.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from envs.base import InvalidActionError, NoAdmissibleActionsError, TextEnvBase

ENV_IDS: dict[str, str] = {
    "sacglam/PlaygroundText-v0": "envs.playground_text:PlaygroundTextEnv",
    "sacglam/BabyAIText-v0": "envs.babyai_text:BabyAITextEnv",
    "sacglam/TextWorld-v0": "envs.textworld_env:TextWorldEnv",
    "sacglam/TextWorldSuite-v0": "envs.textworld_suite:TextWorldSuiteEnv",
    "sacglam/BitFlipText-v0": "envs.bitflip_text:BitFlipTextEnv",
}

for _env_id, _entry_point in ENV_IDS.items():
    if _env_id not in registry:
        # Envs own their (per-goal) step limits, so no TimeLimit wrapper; text spaces make the checker noisy.
        register(id=_env_id, entry_point=_entry_point, disable_env_checker=True, order_enforce=False)

__all__ = ["ENV_IDS", "InvalidActionError", "NoAdmissibleActionsError", "TextEnvBase"]
