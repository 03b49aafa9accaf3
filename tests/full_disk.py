"""A file on a disk that fills up: the tests' stand-in for ENOSPC in the middle of a real write."""

import errno
import io


class FullDisk(io.FileIO):
    """A file whose writes fail with ENOSPC once they would pass ``budget`` bytes.

    Example:
        >>> f = FullDisk(path, "wb", budget=4)
        >>> f.write(b"abcd"); f.write(b"e")   # 4, then OSError(ENOSPC)
    """

    def __init__(self, file, mode="wb", budget=4096):
        super().__init__(file, mode)
        self.budget = budget

    def write(self, data):
        if self.tell() + len(data) > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)
