// Who may call what: bearer tokens, each scoped to some banks and to read
// or read-write access, from a token file.
//
//   # token        banks            access   (a word starting with # starts a comment)
//   admin-secret                             (alone on its line: every bank, read-write)
//   ingest-secret  digits,faces     rw
//   viewer-secret  demo-*           r        (a trailing * matches a name prefix)
//
//   ENGRAM_ASSIGN_OR_RETURN(AccessPolicy policy, AccessPolicy::Parse(file_text));
//   ENGRAM_RETURN_IF_ERROR(policy.Check(header, "digits", Access::kWrite));
//
// Thread-safety: const methods may be called concurrently.
#ifndef ENGRAM_SERVER_ACCESS_H_
#define ENGRAM_SERVER_ACCESS_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace engram::server {

enum class Access { kRead, kWrite };

struct TokenScope {
  std::string token;
  // Bank names; "*" is every bank, "prefix*" every name starting so.
  std::vector<std::string> banks = {"*"};
  bool write = true;

  bool Reaches(std::string_view bank) const;
  bool every_bank() const;
};

class AccessPolicy {
 public:
  // No token: every call is allowed.
  AccessPolicy() = default;
  // One token with every bank, read-write.
  static AccessPolicy SingleToken(std::string token);
  // The token file's text (format above); INVALID_ARGUMENT naming the line
  // for an unknown access word, a repeated token or a file with no token.
  static absl::StatusOr<AccessPolicy> Parse(std::string_view text);

  bool enabled() const { return !scopes_.empty(); }
  size_t size() const { return scopes_.size(); }

  // The scope of the call's "authorization" metadata (`header`, empty if
  // absent): UNAUTHENTICATED unless it is "Bearer <a known token>"; null
  // (every bank, read-write) when no token is configured. Each token is
  // compared in constant time in its content.
  absl::StatusOr<const TokenScope*> Authenticate(std::string_view header) const;

  // PERMISSION_DENIED when `scope` (from Authenticate) does not reach
  // `bank` with `access`. A null `bank` means every bank (Backup).
  static absl::Status Allows(const TokenScope* scope, const std::string* bank, Access access);

  // Authenticate, then Allows.
  absl::Status Check(std::string_view header, const std::string* bank, Access access) const;

 private:
  std::vector<TokenScope> scopes_;
};

}  // namespace engram::server

#endif  // ENGRAM_SERVER_ACCESS_H_
