"""`fedmoe`, the command line: one parser that dispatches to each side's commands (coordinator,
agent, model, admin). Thin: parse, validate, call a function, print."""
