"""Active learning: query strategies, pool scoring, the simulation loop and `emseg suggest`."""
