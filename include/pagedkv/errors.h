// Exceptions of the core. The binding layer maps each one to the Python exception of DESIGN.md §4:
//   ArgumentError -> ValueError, TypeMismatch -> TypeError, UnknownSequence -> KeyError,
//   LayerOutOfRange -> IndexError, OutOfBlocks -> pagedkv.OutOfBlocksError (a MemoryError),
//   IoError -> OSError with its errno, CorruptBlock -> pagedkv.CorruptBlockError (an OSError),
//   anything else (CudaError, InternalError) -> RuntimeError.
#pragma once
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace pagedkv {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ArgumentError : Error { using Error::Error; };
struct TypeMismatch : Error { using Error::Error; };
struct UnknownSequence : Error { using Error::Error; };
struct LayerOutOfRange : Error { using Error::Error; };
struct OutOfBlocks : Error { using Error::Error; };
struct CudaError : Error { using Error::Error; };
struct InternalError : Error { using Error::Error; };
// An operating-system call failed (the disk tier's file): `err` is its errno.
struct IoError : Error {
  IoError(const std::string& what, int err) : Error(what), err(err) {}
  int err;
};
// A block read back from the disk tier is not the block written there (checksum mismatch, file
// cut short). `detail` says what was wrong with which slot; what() also names the block's owners
// where the read happened on their behalf.
struct CorruptBlock : IoError {
  CorruptBlock(const std::string& what, int err, std::string detail)
      : IoError(what, err), detail(std::move(detail)) {}
  std::string detail;
};

namespace detail {
// Messages are built without iostreams: a stream's locale machinery crashed inside the module
// when a host process had loaded another libstdc++ build first (seen under torch on a GPU host).
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
template <typename T>
void append(std::string& s, const T& v) {
  static_assert(std::is_arithmetic_v<T>, "messages take strings and numbers");
  s += std::to_string(v);
}
template <typename... Args>
std::string concat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
template <typename E, typename... Args>
[[noreturn]] void raise(const char* file, int line, const Args&... args) {
  // The message is for the user: what was wrong and what was expected. The source location is
  // for us, so only debug builds append it (release builds, the wheel, never show a path).
#ifndef NDEBUG
  throw E(concat(args..., " [", file, ":", line, "]"));
#else
  (void)file;
  (void)line;
  throw E(concat(args...));
#endif
}
}  // namespace detail

}  // namespace pagedkv

// PKV_CHECK(cond, ExcType, message parts...): throws ExcType with the parts (and, in debug builds,
// file:line).
#define PKV_CHECK(cond, Exc, ...)                                                \
  do {                                                                           \
    if (!(cond)) ::pagedkv::detail::raise<::pagedkv::Exc>(__FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

#define PKV_FAIL(Exc, ...) ::pagedkv::detail::raise<::pagedkv::Exc>(__FILE__, __LINE__, __VA_ARGS__)
