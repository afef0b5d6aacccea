"""Trajectories on disk and the one dataset API every trainer reads them through.

`Episode` is one trajectory in memory; `EpisodeStore` writes and reads episode files (one HDF5 file
per episode, robomimic's key layout, written atomically); `TrajectoryDataset` opens a dataset folder,
verifies every episode (corrupt or truncated files are reported and skipped) and offers the views the
trainers need: world-model windows, reward-model clips, policy samples and start states.
"""

from wmpo.data.dataset import TrajectoryDataset
from wmpo.data.episode import Episode, EpisodeInfo
from wmpo.data.store import CorruptEpisodeError, EpisodeStore

__all__ = ["CorruptEpisodeError", "Episode", "EpisodeInfo", "EpisodeStore", "TrajectoryDataset"]
