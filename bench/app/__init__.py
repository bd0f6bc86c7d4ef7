"""The app: run configuration, runner, CLI, grids and executors, tables, reports and figures.
Sits on top of everything; nothing imports it."""
