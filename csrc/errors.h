// Error reporting of the C entry points: a message per calling thread, returned by *_last_error().
#pragma once

#include <exception>

namespace fastft {

// Records a printf-style message for the calling thread and returns 1 (the entry points' error code).
int set_error(const char* format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;

}  // namespace fastft

// Turns a C++ exception inside an entry point into an error code (nothing may unwind into C).
#define FASTFT_CATCH_ALL                                                        \
  catch (const std::exception& error) {                                         \
    return fastft::set_error("%s", error.what());                               \
  }                                                                             \
  catch (...) {                                                                 \
    return fastft::set_error("unknown C++ exception");                          \
  }
