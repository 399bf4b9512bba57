// gMock matchers for absl::Status / absl::StatusOr (Debian's Abseil has none).
//
//   EXPECT_THAT(registry->GetBank("nope"), StatusIs(absl::StatusCode::kNotFound));
//   ASSERT_OK(registry->DeleteBank("a"));
#ifndef ENGRAM_TESTS_TESTING_STATUS_MATCHERS_H_
#define ENGRAM_TESTS_TESTING_STATUS_MATCHERS_H_

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace engram::testing {

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) { return s.status(); }

MATCHER_P(StatusIs, code,
          std::string("has status code ") + absl::StatusCodeToString(code)) {
  const absl::Status& s = GetStatus(arg);
  *result_listener << "status is " << s.ToString();
  return s.code() == code;
}

}  // namespace engram::testing

#define ASSERT_OK(expr) ASSERT_TRUE(::engram::testing::GetStatus(expr).ok()) \
    << ::engram::testing::GetStatus(expr).ToString()
#define EXPECT_OK(expr) EXPECT_TRUE(::engram::testing::GetStatus(expr).ok()) \
    << ::engram::testing::GetStatus(expr).ToString()

#endif  // ENGRAM_TESTS_TESTING_STATUS_MATCHERS_H_
