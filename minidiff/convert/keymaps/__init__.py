"""Key maps, one file per model family: other libraries' names -> minidiff's."""
