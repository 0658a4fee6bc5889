"""The 11 extra DeepMind Control tasks of MT160, first defined by the TD-MPC2 project.

Each task reuses a suite domain (its physics class, model and timing) with a new reward, except the
three-link reacher, which swaps the suite reacher's arm for a longer chain. Every environment is built
directly as a `control.Environment`; nothing is registered in dm_control's global task lists.

TD-MPC2's models differ from the suite's only in the floor size of cheetah and walker (twice as long, so
that backward runners stay on the rendered floor). MuJoCo planes are infinite for collisions, so the
dynamics are identical and the suite models are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable
from xml.etree import ElementTree

import numpy as np
from dm_control import mujoco
from dm_control.rl import control
from dm_control.suite import ball_in_cup, base, cheetah, hopper, pendulum, reacher, walker
from dm_control.utils import rewards

INFINITY = float("inf")

# Reward constants (heights in m, speeds in m/s or rad/s), as TD-MPC2 defines them.
WALKER_STAND_HEIGHT = 1.2  # the suite walker's
WALKER_WALK_SPEED = 1.0  # the suite walker's walk and run speeds, now backwards
WALKER_RUN_SPEED = 8.0
CHEETAH_BACKWARDS_SPEED = 8.0  # 0.8 x the suite cheetah's run speed
CHEETAH_REARED_SPEED = 6.0  # 0.6 x the suite cheetah's run speed, running on one foot
CHEETAH_JUMP_SPEED = 0.5  # jumping is rewarded only while nearly in place
CHEETAH_REARED_HEIGHT = 1.2
HOPPER_STAND_HEIGHT = 0.6  # the suite hopper's
HOPPER_BACKWARDS_SPEED = 1.0  # half the suite hopper's forward hop speed
CUP_SPIN_DISTANCE = 0.5  # ball-to-cup distance
CUP_SPIN_SPEED = 6.0
CUP_START_OUTSIDE_PROBABILITY = 0.1
PENDULUM_SPIN_SPEED = 9.0
REACHER_BIG_TARGET = 0.05  # target radii of the suite's reacher-easy and reacher-hard
REACHER_SMALL_TARGET = 0.015


def at_least(value: float, threshold: float, margin: float, value_at_margin: float) -> float:
    """1 from `threshold` up; below it falls linearly, through `value_at_margin` at `threshold - margin`, to 0."""
    return rewards.tolerance(
        value, bounds=(threshold, INFINITY), margin=margin, value_at_margin=value_at_margin, sigmoid="linear"
    )


def high_enough(height: float, threshold: float) -> float:
    """1 from `threshold` up, a gaussian fall-off below it (0.1 at half the threshold), like the suite's
    standing terms."""
    return rewards.tolerance(height, bounds=(threshold, INFINITY), margin=threshold / 2)


class WalkerBackwards(walker.PlanarWalker):
    """The suite's walk/run reward with the velocity term mirrored: upright, and moving along -x."""

    def get_reward(self, physics: walker.Physics) -> float:
        """Stand reward x (5 * move + 1) / 6, move 1 from `move_speed` along -x up and linear below; in [0, 1]."""
        standing = high_enough(physics.torso_height(), WALKER_STAND_HEIGHT)
        upright = (1 + physics.torso_upright()) / 2
        stand_reward = (3 * standing + upright) / 4
        speed = -physics.horizontal_velocity()
        move_reward = at_least(speed, self._move_speed, margin=self._move_speed / 2, value_at_margin=0.5)
        return stand_reward * (5 * move_reward + 1) / 6


class CheetahRunBackwards(cheetah.Cheetah):
    """The suite's run reward along -x, with a lower top speed."""

    def get_reward(self, physics: cheetah.Physics) -> float:
        """1 from CHEETAH_BACKWARDS_SPEED along -x up, falling linearly to 0 at a standstill or moving forwards."""
        speed = -physics.speed()
        return at_least(speed, CHEETAH_BACKWARDS_SPEED, margin=CHEETAH_BACKWARDS_SPEED, value_at_margin=0.0)


class CheetahRunReared(cheetah.Cheetah):
    """Run forwards on one foot: the torso and the other (raised) foot high, paid more when fast."""

    def __init__(self, raised_foot: str, random: int | None = None):
        super().__init__(random=random)
        self.raised_foot = raised_foot

    def get_reward(self, physics: cheetah.Physics) -> float:
        """Up reward (3/5 raised foot, 2/5 torso height) x (5 * fast + 1) / 6, fast linear in the forward speed."""
        torso_up = high_enough(physics.named.data.xpos["torso", "z"], CHEETAH_REARED_HEIGHT)
        foot_up = high_enough(physics.named.data.xpos[self.raised_foot, "z"], CHEETAH_REARED_HEIGHT)
        up_reward = (3 * foot_up + 2 * torso_up) / 5
        fast = at_least(physics.speed(), CHEETAH_REARED_SPEED, margin=CHEETAH_REARED_SPEED, value_at_margin=0.0)
        return up_reward * (5 * fast + 1) / 6


class CheetahJump(cheetah.Cheetah):
    """Rear up on either foot while staying nearly in place.

    TD-MPC2 averages two rewards, one per raised foot, each (5 * reared + in_place) / 6 where `reared` scores
    the mean height of the torso and that foot; the average of the two is written here as one expression.
    """

    def get_reward(self, physics: cheetah.Physics) -> float:
        """(5 * mean of the two feet's reared scores + in_place) / 6, as the class docstring says; in [0, 1]."""
        torso_height = physics.named.data.xpos["torso", "z"]
        reared = [
            high_enough((torso_height + physics.named.data.xpos[raised_foot, "z"]) / 2, CHEETAH_REARED_HEIGHT)
            for raised_foot in ("bfoot", "ffoot")
        ]
        in_place = rewards.tolerance(
            physics.speed(),
            bounds=(-CHEETAH_JUMP_SPEED, CHEETAH_JUMP_SPEED),
            margin=CHEETAH_JUMP_SPEED,
            value_at_margin=0.0,
            sigmoid="linear",
        )
        return (5 * np.mean(reared) + in_place) / 6


class HopperHopBackwards(hopper.Hopper):
    """The suite's hop reward along -x, with half the target speed and a tighter margin."""

    def __init__(self, random: int | None = None):
        super().__init__(hopping=True, random=random)

    def get_reward(self, physics: hopper.Physics) -> float:
        """Standing (1 at heights in [0.6, 2], else 0) x hopping (1 from HOPPER_BACKWARDS_SPEED along -x, linear
        below)."""
        standing = rewards.tolerance(physics.height(), bounds=(HOPPER_STAND_HEIGHT, 2))
        speed = -physics.speed()
        hopping = at_least(speed, HOPPER_BACKWARDS_SPEED, margin=HOPPER_BACKWARDS_SPEED / 2, value_at_margin=0.5)
        return standing * hopping


class CupSpin(ball_in_cup.BallInCup):
    """Swing the ball fast and far around the cup; nothing is paid while the ball is in the cup."""

    def initialize_episode(self, physics: ball_in_cup.Physics) -> None:
        """Place the ball in the cup, or with CUP_START_OUTSIDE_PROBABILITY anywhere collision-free."""
        # Most episodes start with the ball in the cup (the spin must first get it out); the rest start
        # anywhere collision-free, as in the suite's catch task. The draw order fixes the start of a seed.
        may_start_outside = self.random.uniform() < CUP_START_OUTSIDE_PROBABILITY
        while True:
            physics.named.data.qpos["ball_x"] = self.random.uniform(-0.2, 0.2)
            physics.named.data.qpos["ball_z"] = self.random.uniform(0.2, 0.5)
            physics.after_reset()
            if physics.data.ncon == 0 and (may_start_outside or physics.in_target()):
                break
        # Skip BallInCup's own placement loop; base.Task finishes the reset.
        base.Task.initialize_episode(self, physics)

    def get_reward(self, physics: ball_in_cup.Physics) -> float:
        """0 while the ball is in the cup, else (far + 2 * fast) / 3 of the ball's distance to the cup and its speed."""
        distance = np.linalg.norm(physics.ball_to_target())
        speed = np.linalg.norm(physics.named.data.qvel[["ball_x", "ball_z"]])
        far = at_least(distance, CUP_SPIN_DISTANCE, margin=CUP_SPIN_DISTANCE / 2, value_at_margin=0.5)
        fast = at_least(speed, CUP_SPIN_SPEED, margin=CUP_SPIN_SPEED / 2, value_at_margin=0.5)
        return (1 - physics.in_target()) * (far + 2 * fast) / 3


class PendulumSpin(pendulum.SwingUp):
    """Spin the pole fast in either direction (swing-up's start and observations)."""

    def get_reward(self, physics: pendulum.Physics) -> float:
        """1 from PENDULUM_SPIN_SPEED rad/s of angular speed up, linear below it (0.5 at half of it, 0 at rest)."""
        speed = np.linalg.norm(physics.angular_velocity())
        return at_least(speed, PENDULUM_SPIN_SPEED, margin=PENDULUM_SPIN_SPEED / 2, value_at_margin=0.5)


# TD-MPC2's three-link arm: two 9 cm upper links and a hand whose capsule is 10 cm long but whose fingertip
# sits at 9 cm (the suite's two-link arm has the same quirk: a 10 cm hand, fingertip at 12 cm). The capsule
# lengths set the link masses, so they are kept exactly. Joint ranges are in degrees (MJCF's default).
THREE_LINK_ARM = """
<body name="arm0" pos="0 0 .01">
  <joint name="shoulder0"/>
  <geom name="arm0" type="capsule" fromto="0 0 0 .09 0 0" size=".01" material="self"/>
  <body name="arm1" pos=".09 0 0">
    <joint name="shoulder1" limited="true" range="-80 80"/>
    <geom name="arm1" type="capsule" fromto="0 0 0 .09 0 0" size=".01" material="self"/>
    <body name="hand" pos=".09 0 0">
      <joint name="wrist" limited="true" range="-80 80"/>
      <geom name="hand" type="capsule" fromto="0 0 0 .1 0 0" size=".01" material="self"/>
      <body name="finger" pos=".09 0 0">
        <camera name="hand" pos="0 0 .2" mode="track"/>
        <geom name="finger" type="sphere" size=".01" material="effector"/>
      </body>
    </body>
  </body>
</body>
"""
THREE_LINK_MOTORS = """
<actuator>
  <motor name="shoulder0" joint="shoulder0"/>
  <motor name="shoulder1" joint="shoulder1"/>
  <motor name="wrist" joint="wrist"/>
</actuator>
"""


def three_link_reacher_model() -> tuple[str, dict]:
    """The suite reacher's model (arena, options, joint and motor defaults) with the three-link arm."""
    xml, assets = reacher.get_model_and_assets()
    model = ElementTree.fromstring(xml)
    model.set("model", "three-link planar reacher")
    worldbody = model.find("worldbody")
    two_link_arm = worldbody.find("body[@name='arm']")
    position = list(worldbody).index(two_link_arm)  # keep the body order: the target geom stays after the arm
    worldbody.remove(two_link_arm)
    worldbody.insert(position, ElementTree.fromstring(THREE_LINK_ARM))
    model.remove(model.find("actuator"))
    model.append(ElementTree.fromstring(THREE_LINK_MOTORS))
    return ElementTree.tostring(model, encoding="unicode"), assets


@dataclass(frozen=True)
class Domain:
    """What an extra task borrows from a suite domain. Every domain here runs 1000 control steps."""

    physics_class: type[mujoco.Physics]
    model: Callable[[], tuple[str | bytes, dict]]  # () -> (MJCF text, assets)
    time_limit: float  # seconds
    control_timestep: float | None = None  # seconds; None: one physics step per control step


WALKER = Domain(walker.Physics, walker.get_model_and_assets, time_limit=25, control_timestep=0.025)
CHEETAH = Domain(cheetah.Physics, cheetah.get_model_and_assets, time_limit=10)
HOPPER = Domain(hopper.Physics, hopper.get_model_and_assets, time_limit=20, control_timestep=0.02)
CUP = Domain(ball_in_cup.Physics, ball_in_cup.get_model_and_assets, time_limit=20, control_timestep=0.02)
PENDULUM = Domain(pendulum.Physics, pendulum.get_model_and_assets, time_limit=20)
THREE_LINK_REACHER = Domain(reacher.Physics, three_link_reacher_model, time_limit=20)

# task name -> (domain, task constructor taking `random`)
EXTRA_TASKS: dict[str, tuple[Domain, Callable[..., base.Task]]] = {
    "walker-walk-backwards": (WALKER, partial(WalkerBackwards, move_speed=WALKER_WALK_SPEED)),
    "walker-run-backwards": (WALKER, partial(WalkerBackwards, move_speed=WALKER_RUN_SPEED)),
    "cheetah-run-backwards": (CHEETAH, CheetahRunBackwards),
    "cheetah-run-front": (CHEETAH, partial(CheetahRunReared, raised_foot="bfoot")),  # runs on the front foot
    "cheetah-run-back": (CHEETAH, partial(CheetahRunReared, raised_foot="ffoot")),  # runs on the back foot
    "cheetah-jump": (CHEETAH, CheetahJump),
    "hopper-hop-backwards": (HOPPER, HopperHopBackwards),
    "reacher-three-easy": (THREE_LINK_REACHER, partial(reacher.Reacher, target_size=REACHER_BIG_TARGET)),
    "reacher-three-hard": (THREE_LINK_REACHER, partial(reacher.Reacher, target_size=REACHER_SMALL_TARGET)),
    "cup-spin": (CUP, CupSpin),
    "pendulum-spin": (PENDULUM, PendulumSpin),
}


def load_extra_task(task_name: str, random: int) -> control.Environment:
    """Build the dm_control environment of an extra task; `random` seeds its initial states."""
    domain, make_task = EXTRA_TASKS[task_name]
    physics = domain.physics_class.from_xml_string(*domain.model())
    return control.Environment(
        physics, make_task(random=random), time_limit=domain.time_limit, control_timestep=domain.control_timestep
    )
