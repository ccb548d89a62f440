"""The report stage (`ghsae report`, `ghsae rate`): evals, baseline fairness, clustering views,
circuits, dashboards, the rating kit, and the HTML page."""
