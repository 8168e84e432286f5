//! Empty: the checks live in tests/.
