"""Errors that mean "the user's input is wrong": the CLI prints them on one line and exits 2."""


class UserError(Exception):
    """Bad input: a file, a row, a key or a value the user can fix. The message names it."""


class ConfigError(UserError):
    """A pipeline YAML or an override that does not fit the typed stage configs."""


class DataError(UserError):
    """A data file that cannot be read or has a bad row."""


class ArtifactError(UserError):
    """A run directory whose artifacts are missing, corrupted or in use."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that it ends a run the same way;
    a handler that lets Ctrl-C only stop the current step (chat's reply) lets this one through."""


class TrainingDiverged(Exception):
    """Training produced only NaN or inf updates for too long, or final weights holding a NaN or inf;
    the last good checkpoint and the stage's previous complete output are kept. The CLI exits 1."""
