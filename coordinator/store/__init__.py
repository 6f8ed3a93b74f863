"""The run store: the run database (runs, rounds, participations, nodes), its migrations,
and the views of it every reader shares (admin API, dashboard, CLI, report)."""
