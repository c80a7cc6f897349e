"""kNN backends used by the mine stage."""
