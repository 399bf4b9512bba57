#include "server/access.h"

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace engram::server {
namespace {

constexpr std::string_view kBearer = "Bearer ";

bool HasPrefix(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() && s.substr(0, prefix.size()) == prefix;
}

// Constant time in the content of `want` (its length is not secret).
bool SameToken(std::string_view want, std::string_view got) {
  unsigned char diff = got.size() == want.size() ? 0 : 1;
  const std::string_view probe = got.size() == want.size() ? got : want;
  for (size_t i = 0; i < want.size(); ++i) {
    diff |= static_cast<unsigned char>(probe[i] ^ want[i]);
  }
  return diff == 0;
}

}  // namespace

bool TokenScope::Reaches(std::string_view bank) const {
  for (const std::string& b : banks) {
    if (b == "*" || b == bank) return true;
    if (!b.empty() && b.back() == '*' &&
        HasPrefix(bank, std::string_view(b).substr(0, b.size() - 1))) {
      return true;
    }
  }
  return false;
}

bool TokenScope::every_bank() const {
  for (const std::string& b : banks) {
    if (b == "*") return true;
  }
  return false;
}

AccessPolicy AccessPolicy::SingleToken(std::string token) {
  AccessPolicy p;
  if (!token.empty()) p.scopes_.push_back(TokenScope{std::move(token)});
  return p;
}

absl::StatusOr<AccessPolicy> AccessPolicy::Parse(std::string_view text) {
  AccessPolicy p;
  absl::flat_hash_set<std::string> seen;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(absl::string_view(text.data(), text.size()), '\n')) {
    ++line_no;
    // A word starting with # starts a comment to the end of the line.
    for (size_t i = 0; i < line.size(); ++i) {
      if (line[i] == '#' && (i == 0 || line[i - 1] == ' ' || line[i - 1] == '\t')) {
        line = line.substr(0, i);
        break;
      }
    }
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    std::vector<std::string> words = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (words.size() > 3) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token file line ", line_no, ": expected TOKEN [BANKS [r|rw]], got ", words.size(),
          " words"));
    }
    TokenScope scope;
    scope.token = words[0];
    if (words.size() >= 2) scope.banks = absl::StrSplit(words[1], ',', absl::SkipEmpty());
    if (scope.banks.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("token file line ", line_no, ": no bank listed"));
    }
    if (words.size() == 3) {
      if (words[2] != "r" && words[2] != "rw") {
        return absl::InvalidArgumentError(absl::StrCat(
            "token file line ", line_no, ": access must be r or rw, got '", words[2], "'"));
      }
      scope.write = words[2] == "rw";
    }
    if (!seen.insert(scope.token).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("token file line ", line_no, ": the token appears on an earlier line"));
    }
    p.scopes_.push_back(std::move(scope));
  }
  if (p.scopes_.empty()) return absl::InvalidArgumentError("the token file holds no token");
  return p;
}

absl::StatusOr<const TokenScope*> AccessPolicy::Authenticate(std::string_view header) const {
  if (scopes_.empty()) return nullptr;
  const bool bearer = HasPrefix(header, kBearer);
  const std::string_view got = bearer ? header.substr(kBearer.size()) : std::string_view();
  const TokenScope* match = nullptr;
  // Every token is compared, so the time does not say which one matched.
  for (const TokenScope& s : scopes_) {
    if (SameToken(s.token, got) && bearer) match = &s;
  }
  if (match == nullptr) {
    return absl::UnauthenticatedError(
        "this server requires 'authorization: Bearer <token>' metadata");
  }
  return match;
}

absl::Status AccessPolicy::Allows(const TokenScope* scope, const std::string* bank,
                                  Access access) {
  if (scope == nullptr) return absl::OkStatus();
  const bool reaches = bank == nullptr ? scope->every_bank() : scope->Reaches(*bank);
  const std::string what = bank == nullptr ? "every bank" : absl::StrCat("bank '", *bank, "'");
  if (!reaches) {
    return absl::PermissionDeniedError(absl::StrCat("this token does not reach ", what));
  }
  if (access == Access::kWrite && !scope->write) {
    return absl::PermissionDeniedError(absl::StrCat("this token may read ", what, " but not write"));
  }
  return absl::OkStatus();
}

absl::Status AccessPolicy::Check(std::string_view header, const std::string* bank,
                                 Access access) const {
  absl::StatusOr<const TokenScope*> scope = Authenticate(header);
  if (!scope.ok()) return scope.status();
  return Allows(*scope, bank, access);
}

}  // namespace engram::server
