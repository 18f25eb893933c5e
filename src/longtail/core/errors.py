"""The one exception type for mistakes a user can fix (bad paths, values, files)."""


class LongtailError(Exception):
    """A user error: the message says what was wrong and how to fix it.

    The CLI prints it as one line and exits with status 2, without a traceback.
    """


class KernelInputError(LongtailError):
    """A tensor handed to a C kernel has the wrong dtype, layout, shape or device."""
