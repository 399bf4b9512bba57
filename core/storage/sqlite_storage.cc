// SQLite-backed BankStorage: one database file, WAL journal,
// synchronous=FULL, one transaction per call.
#include <sqlite3.h>

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "engram/core/status_macros.h"
#include "engram/core/storage.h"

namespace engram::core {
namespace {

constexpr char kSchema[] = R"sql(
CREATE TABLE IF NOT EXISTS banks (
  name TEXT PRIMARY KEY,
  dim INTEGER NOT NULL,
  kind INTEGER NOT NULL,
  precision INTEGER NOT NULL,
  family INTEGER NOT NULL,
  degree INTEGER NOT NULL,
  rectified INTEGER NOT NULL,
  beta REAL NOT NULL,
  similarity INTEGER NOT NULL,
  separation INTEGER NOT NULL,
  value_dim INTEGER NOT NULL DEFAULT 0,
  ttl_ms INTEGER NOT NULL DEFAULT 0,
  decay_half_life_ms INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS patterns (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  bank TEXT NOT NULL REFERENCES banks(name) ON DELETE CASCADE,
  id INTEGER NOT NULL,
  vec BLOB NOT NULL,
  payload BLOB NOT NULL,
  value BLOB NOT NULL DEFAULT x'',
  labels BLOB NOT NULL DEFAULT x'',
  expires_ms INTEGER NOT NULL DEFAULT 0,
  stored_ms INTEGER NOT NULL DEFAULT 0,
  UNIQUE (bank, id)
);
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value INTEGER NOT NULL
);
)sql";

// Columns added after the first schema: databases written before them get
// them (with their defaults) when opened.
struct AddedColumn {
  const char* table;
  const char* name;
  const char* definition;
};
constexpr AddedColumn kAddedColumns[] = {
    {"banks", "value_dim", "INTEGER NOT NULL DEFAULT 0"},
    {"banks", "ttl_ms", "INTEGER NOT NULL DEFAULT 0"},
    {"banks", "next_id", "INTEGER NOT NULL DEFAULT 0"},
    {"patterns", "value", "BLOB NOT NULL DEFAULT x''"},
    {"patterns", "labels", "BLOB NOT NULL DEFAULT x''"},
    {"patterns", "expires_ms", "INTEGER NOT NULL DEFAULT 0"},
    {"banks", "decay_half_life_ms", "INTEGER NOT NULL DEFAULT 0"},
    {"patterns", "stored_ms", "INTEGER NOT NULL DEFAULT 0"},
};

// Labels as bytes: per entry a tag ('s' string, 'i' integer), the key's
// length (4 bytes) and bytes, then the value (length and bytes, or 8
// bytes), little-endian as the host writes them.
void PutU32(std::string* out, uint32_t v) { out->append(reinterpret_cast<const char*>(&v), 4); }

std::string EncodeLabels(const Labels& l) {
  std::string out;
  for (const auto& [k, v] : l.strings) {
    out += 's';
    PutU32(&out, static_cast<uint32_t>(k.size()));
    out += k;
    PutU32(&out, static_cast<uint32_t>(v.size()));
    out += v;
  }
  for (const auto& [k, v] : l.ints) {
    out += 'i';
    PutU32(&out, static_cast<uint32_t>(k.size()));
    out += k;
    out.append(reinterpret_cast<const char*>(&v), 8);
  }
  return out;
}

bool DecodeLabels(std::string_view in, Labels* l) {
  *l = Labels();
  auto take = [&](size_t n, std::string_view* part) {
    if (in.size() < n) return false;
    *part = in.substr(0, n);
    in.remove_prefix(n);
    return true;
  };
  auto take_u32 = [&](uint32_t* v) {
    std::string_view b;
    if (!take(4, &b)) return false;
    std::memcpy(v, b.data(), 4);
    return true;
  };
  while (!in.empty()) {
    const char tag = in[0];
    in.remove_prefix(1);
    uint32_t len = 0;
    std::string_view key, value;
    if (!take_u32(&len) || !take(len, &key)) return false;
    if (tag == 's') {
      if (!take_u32(&len) || !take(len, &value)) return false;
      l->strings.emplace_back(std::string(key), std::string(value));
    } else if (tag == 'i') {
      if (!take(8, &value)) return false;
      int64_t v;
      std::memcpy(&v, value.data(), 8);
      l->ints.emplace_back(std::string(key), v);
    } else {
      return false;
    }
  }
  return true;
}

class Statement {
 public:
  Statement(sqlite3* db, const char* sql) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  bool ok() const { return rc_ == SQLITE_OK; }
  sqlite3_stmt* get() { return stmt_; }

 private:
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
};

class SqliteStorage final : public BankStorage {
 public:
  explicit SqliteStorage(sqlite3* db) : db_(db) {}
  ~SqliteStorage() override { sqlite3_close_v2(db_); }

  absl::Status Init() {
    ENGRAM_RETURN_IF_ERROR(Exec("PRAGMA journal_mode=WAL;"));
    ENGRAM_RETURN_IF_ERROR(Exec("PRAGMA synchronous=FULL;"));
    ENGRAM_RETURN_IF_ERROR(Exec("PRAGMA foreign_keys=ON;"));
    ENGRAM_RETURN_IF_ERROR(Exec(kSchema));
    for (const AddedColumn& c : kAddedColumns) {
      ENGRAM_ASSIGN_OR_RETURN(bool present, HasColumn(c.table, c.name));
      if (present) continue;
      const std::string sql =
          absl::StrCat("ALTER TABLE ", c.table, " ADD COLUMN ", c.name, " ", c.definition, ";");
      ENGRAM_RETURN_IF_ERROR(Exec(sql.c_str()));
    }
    return absl::OkStatus();
  }

  absl::Status CreateBank(const BankSpec& spec, const WriteMeta& meta) override {
    std::lock_guard<std::mutex> lock(mu_);
    ENGRAM_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE;"));
    return Finish([&]() -> absl::Status {
    Statement st(db_,
                 "INSERT INTO banks (name, dim, kind, precision, family, degree,"
                 " rectified, beta, similarity, separation, value_dim, ttl_ms,"
                 " decay_half_life_ms)"
                 " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)");
    if (!st.ok()) return Error("prepare insert bank");
    sqlite3_bind_text(st.get(), 1, spec.name.data(), spec.name.size(),
                      SQLITE_TRANSIENT);
    sqlite3_bind_int(st.get(), 2, spec.dim);
    sqlite3_bind_int(st.get(), 3, static_cast<int>(spec.kind));
    sqlite3_bind_int(st.get(), 4, static_cast<int>(spec.precision));
    sqlite3_bind_int(st.get(), 5, static_cast<int>(spec.energy.family));
    sqlite3_bind_int(st.get(), 6, spec.energy.degree);
    sqlite3_bind_int(st.get(), 7, spec.energy.rectified ? 1 : 0);
    sqlite3_bind_double(st.get(), 8, spec.energy.beta);
    sqlite3_bind_int(st.get(), 9, static_cast<int>(spec.energy.similarity));
    sqlite3_bind_int(st.get(), 10, static_cast<int>(spec.energy.separation));
    sqlite3_bind_int(st.get(), 11, spec.value_dim);
    sqlite3_bind_int64(st.get(), 12, spec.ttl_ms);
    sqlite3_bind_int64(st.get(), 13, spec.decay_half_life_ms);
    if (sqlite3_step(st.get()) != SQLITE_DONE) return Error("insert bank");
    return WriteMetaRows(spec.name, meta);
    }());
  }

  absl::Status DeleteBank(std::string_view name, const WriteMeta& meta) override {
    std::lock_guard<std::mutex> lock(mu_);
    ENGRAM_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE;"));
    absl::Status s = [&]() -> absl::Status {
      for (const char* sql : {"DELETE FROM patterns WHERE bank = ?",
                              "DELETE FROM banks WHERE name = ?"}) {
        Statement st(db_, sql);
        if (!st.ok()) return Error("prepare delete bank");
        sqlite3_bind_text(st.get(), 1, name.data(), name.size(), SQLITE_TRANSIENT);
        if (sqlite3_step(st.get()) != SQLITE_DONE) return Error("delete bank");
      }
      return WriteMetaRows(name, meta);
    }();
    return Finish(s);
  }

  absl::Status AppendPatterns(std::string_view bank,
                              absl::Span<const uint64_t> ids,
                              absl::Span<const float> data,
                              absl::Span<const std::string> payloads,
                              const PatternExtras& extras, const WriteMeta& meta) override {
    if (ids.empty()) {
      if (meta.log_seq == 0) return absl::OkStatus();
      std::lock_guard<std::mutex> lock(mu_);
      ENGRAM_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE;"));
      return Finish(WriteMetaRows(bank, meta));
    }
    const size_t dim = data.size() / ids.size();
    const size_t value_dim = extras.values.size() / ids.size();
    std::lock_guard<std::mutex> lock(mu_);
    ENGRAM_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE;"));
    absl::Status s = [&]() -> absl::Status {
      Statement st(db_,
                   "INSERT INTO patterns (bank, id, vec, payload, value, labels, expires_ms,"
                   " stored_ms) VALUES (?,?,?,?,?,?,?,?)");
      if (!st.ok()) return Error("prepare insert pattern");
      for (size_t r = 0; r < ids.size(); ++r) {
        sqlite3_reset(st.get());
        sqlite3_bind_text(st.get(), 1, bank.data(), bank.size(), SQLITE_STATIC);
        sqlite3_bind_int64(st.get(), 2, static_cast<sqlite3_int64>(ids[r]));
        sqlite3_bind_blob(st.get(), 3, data.data() + r * dim,
                          static_cast<int>(dim * sizeof(float)), SQLITE_STATIC);
        if (payloads.empty()) {
          sqlite3_bind_zeroblob(st.get(), 4, 0);
        } else {
          sqlite3_bind_blob(st.get(), 4, payloads[r].data(),
                            static_cast<int>(payloads[r].size()), SQLITE_STATIC);
        }
        if (value_dim == 0) {
          sqlite3_bind_zeroblob(st.get(), 5, 0);
        } else {
          sqlite3_bind_blob(st.get(), 5, extras.values.data() + r * value_dim,
                            static_cast<int>(value_dim * sizeof(float)), SQLITE_STATIC);
        }
        const std::string labels =
            extras.labels.empty() ? std::string() : EncodeLabels(extras.labels[r]);
        sqlite3_bind_blob(st.get(), 6, labels.data(), static_cast<int>(labels.size()),
                          SQLITE_TRANSIENT);
        sqlite3_bind_int64(st.get(), 7, extras.expires_ms.empty() ? 0 : extras.expires_ms[r]);
        sqlite3_bind_int64(st.get(), 8, extras.stored_ms.empty() ? 0 : extras.stored_ms[r]);
        if (sqlite3_step(st.get()) != SQLITE_DONE) return Error("insert pattern");
      }
      return WriteMetaRows(bank, meta);
    }();
    return Finish(s);
  }

  absl::Status DeletePatterns(std::string_view bank, absl::Span<const uint64_t> ids,
                              const WriteMeta& meta) override {
    std::lock_guard<std::mutex> lock(mu_);
    ENGRAM_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE;"));
    absl::Status s = [&]() -> absl::Status {
      Statement st(db_, "DELETE FROM patterns WHERE bank = ? AND id = ?");
      if (!st.ok()) return Error("prepare delete pattern");
      for (uint64_t id : ids) {
        sqlite3_reset(st.get());
        sqlite3_bind_text(st.get(), 1, bank.data(), bank.size(), SQLITE_STATIC);
        sqlite3_bind_int64(st.get(), 2, static_cast<sqlite3_int64>(id));
        if (sqlite3_step(st.get()) != SQLITE_DONE) return Error("delete pattern");
      }
      ENGRAM_RETURN_IF_ERROR(WriteMetaRows(bank, meta));
      return absl::OkStatus();
    }();
    return Finish(s);
  }

  absl::Status LoadAll(const BankVisitor& on_bank,
                       const PatternVisitor& on_pattern) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement banks(db_,
                    "SELECT name, dim, kind, precision, family, degree, rectified,"
                    " beta, similarity, separation, value_dim, ttl_ms, decay_half_life_ms, next_id"
                    " FROM banks ORDER BY name");
    if (!banks.ok()) return Error("prepare load banks");
    int rc;
    while ((rc = sqlite3_step(banks.get())) == SQLITE_ROW) {
      BankSpec spec;
      sqlite3_stmt* b = banks.get();
      spec.name = reinterpret_cast<const char*>(sqlite3_column_text(b, 0));
      spec.dim = sqlite3_column_int(b, 1);
      spec.kind = static_cast<StateKind>(sqlite3_column_int(b, 2));
      spec.precision = static_cast<Precision>(sqlite3_column_int(b, 3));
      spec.energy.family = static_cast<EnergyFamily>(sqlite3_column_int(b, 4));
      spec.energy.degree = sqlite3_column_int(b, 5);
      spec.energy.rectified = sqlite3_column_int(b, 6) != 0;
      spec.energy.beta = sqlite3_column_double(b, 7);
      spec.energy.similarity = static_cast<SimilarityKind>(sqlite3_column_int(b, 8));
      spec.energy.separation = static_cast<SeparationKind>(sqlite3_column_int(b, 9));
      spec.value_dim = sqlite3_column_int(b, 10);
      spec.ttl_ms = sqlite3_column_int64(b, 11);
      spec.decay_half_life_ms = sqlite3_column_int64(b, 12);
      const uint64_t next_id = static_cast<uint64_t>(sqlite3_column_int64(b, 13));
      if (auto s = on_bank(spec, next_id); !s.ok()) return s;
      Statement pats(db_,
                     "SELECT id, vec, payload, value, labels, expires_ms, stored_ms FROM patterns"
                     " WHERE bank = ?"
                     " ORDER BY seq");
      if (!pats.ok()) return Error("prepare load patterns");
      sqlite3_bind_text(pats.get(), 1, spec.name.data(), spec.name.size(),
                        SQLITE_STATIC);
      std::vector<float> row(spec.dim), value(spec.value_dim);
      Labels labels;
      int prc;
      while ((prc = sqlite3_step(pats.get())) == SQLITE_ROW) {
        sqlite3_stmt* p = pats.get();
        const uint64_t id = static_cast<uint64_t>(sqlite3_column_int64(p, 0));
        const int bytes = sqlite3_column_bytes(p, 1);
        if (bytes != static_cast<int>(spec.dim * sizeof(float))) {
          return absl::DataLossError(absl::StrCat(
              "bank '", spec.name, "' pattern ", id, " has ", bytes,
              " bytes; expected ", spec.dim * sizeof(float)));
        }
        std::memcpy(row.data(), sqlite3_column_blob(p, 1), bytes);
        const char* payload = static_cast<const char*>(sqlite3_column_blob(p, 2));
        const int payload_bytes = sqlite3_column_bytes(p, 2);
        const int value_bytes = sqlite3_column_bytes(p, 3);
        if (value_bytes != static_cast<int>(spec.value_dim * sizeof(float))) {
          return absl::DataLossError(absl::StrCat(
              "bank '", spec.name, "' pattern ", id, " has a ", value_bytes,
              "-byte value; expected ", spec.value_dim * sizeof(float)));
        }
        if (value_bytes > 0) std::memcpy(value.data(), sqlite3_column_blob(p, 3), value_bytes);
        const char* label_bytes = static_cast<const char*>(sqlite3_column_blob(p, 4));
        if (!DecodeLabels(std::string_view(label_bytes ? label_bytes : "",
                                           sqlite3_column_bytes(p, 4)),
                          &labels)) {
          return absl::DataLossError(absl::StrCat(
              "bank '", spec.name, "' pattern ", id, " has unreadable labels"));
        }
        StoredPattern stored;
        stored.id = id;
        stored.data = row;
        stored.payload = std::string_view(payload ? payload : "", payload_bytes);
        stored.value = value;
        stored.labels = &labels;
        stored.expires_ms = sqlite3_column_int64(p, 5);
        stored.stored_ms = sqlite3_column_int64(p, 6);
        if (auto s = on_pattern(spec.name, stored); !s.ok()) return s;
      }
      if (prc != SQLITE_DONE) return Error("load patterns");
    }
    if (rc != SQLITE_DONE) return Error("load banks");
    return absl::OkStatus();
  }

  absl::Status Backup(const std::string& dest_path) override {
    if (std::filesystem::exists(dest_path)) {
      return absl::AlreadyExistsError(absl::StrCat("backup file '", dest_path, "' exists"));
    }
    const std::string tmp = dest_path + ".partial";
    std::filesystem::remove(tmp);
    sqlite3* dest = nullptr;
    if (sqlite3_open_v2(tmp.c_str(), &dest, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                        nullptr) != SQLITE_OK) {
      std::string msg = dest ? sqlite3_errmsg(dest) : "out of memory";
      sqlite3_close_v2(dest);
      return absl::UnavailableError(absl::StrCat("cannot create '", tmp, "': ", msg));
    }
    absl::Status s;
    {
      // Holding the storage lock keeps this process's writers out while the
      // pages are copied in one step: the snapshot is one committed state.
      std::lock_guard<std::mutex> lock(mu_);
      sqlite3_backup* b = sqlite3_backup_init(dest, "main", db_, "main");
      if (b == nullptr) {
        s = absl::InternalError(absl::StrCat("backup: ", sqlite3_errmsg(dest)));
      } else {
        const int rc = sqlite3_backup_step(b, -1);
        sqlite3_backup_finish(b);
        if (rc != SQLITE_DONE) {
          s = absl::InternalError(absl::StrCat("backup: ", sqlite3_errstr(rc)));
        }
      }
    }
    sqlite3_close_v2(dest);
    if (!s.ok()) {
      std::filesystem::remove(tmp);
      return s;
    }
    // Flush the copy before it gets its final name.
    if (FILE* f = std::fopen(tmp.c_str(), "rb+")) {
      std::fflush(f);
      ::fsync(fileno(f));
      std::fclose(f);
    }
    std::error_code ec;
    std::filesystem::rename(tmp, dest_path, ec);
    if (ec) return absl::InternalError(absl::StrCat("backup: rename: ", ec.message()));
    return absl::OkStatus();
  }

 private:
  absl::Status Exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      absl::Status s = Error(err ? err : sql);
      sqlite3_free(err);
      return s;
    }
    return absl::OkStatus();
  }

  absl::StatusOr<uint64_t> LogSequence() override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement st(db_, "SELECT value FROM meta WHERE key = 'log_seq'");
    if (!st.ok()) return Error("prepare read log sequence");
    const int rc = sqlite3_step(st.get());
    if (rc == SQLITE_ROW) return static_cast<uint64_t>(sqlite3_column_int64(st.get(), 0));
    if (rc != SQLITE_DONE) return Error("read log sequence");
    return 0;
  }

  // Writes `meta` inside the caller's transaction (mu_ held).
  absl::Status WriteMetaRows(std::string_view bank, const WriteMeta& meta) {
    if (meta.log_seq != 0) {
      Statement st(db_, "INSERT OR REPLACE INTO meta (key, value) VALUES ('log_seq', ?)");
      if (!st.ok()) return Error("prepare write log sequence");
      sqlite3_bind_int64(st.get(), 1, static_cast<sqlite3_int64>(meta.log_seq));
      if (sqlite3_step(st.get()) != SQLITE_DONE) return Error("write log sequence");
    }
    if (meta.next_id != 0) {
      Statement st(db_, "UPDATE banks SET next_id = ? WHERE name = ?");
      if (!st.ok()) return Error("prepare write next id");
      sqlite3_bind_int64(st.get(), 1, static_cast<sqlite3_int64>(meta.next_id));
      sqlite3_bind_text(st.get(), 2, bank.data(), bank.size(), SQLITE_STATIC);
      if (sqlite3_step(st.get()) != SQLITE_DONE) return Error("write next id");
    }
    return absl::OkStatus();
  }

  absl::StatusOr<bool> HasColumn(const char* table, const char* column) {
    Statement st(db_, absl::StrCat("PRAGMA table_info(", table, ")").c_str());
    if (!st.ok()) return Error("prepare table_info");
    int rc;
    while ((rc = sqlite3_step(st.get())) == SQLITE_ROW) {
      const char* name = reinterpret_cast<const char*>(sqlite3_column_text(st.get(), 1));
      if (name != nullptr && std::strcmp(name, column) == 0) return true;
    }
    if (rc != SQLITE_DONE) return Error("table_info");
    return false;
  }

  // Commits on success, rolls back on failure.
  absl::Status Finish(absl::Status s) {
    if (s.ok()) {
      absl::Status c = Exec("COMMIT;");
      if (c.ok()) return c;
      s = c;
    }
    sqlite3_exec(db_, "ROLLBACK;", nullptr, nullptr, nullptr);
    return s;
  }

  absl::Status Error(std::string_view what) {
    const int code = sqlite3_errcode(db_);
    std::string msg = absl::StrCat("storage: ", std::string(what), ": ", sqlite3_errmsg(db_));
    if (code == SQLITE_FULL) return absl::ResourceExhaustedError(msg);
    if (code == SQLITE_CONSTRAINT) return absl::AlreadyExistsError(msg);
    return absl::InternalError(msg);
  }

  std::mutex mu_;
  sqlite3* db_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<BankStorage>> OpenSqliteStorage(
    const std::string& path) {
  sqlite3* db = nullptr;
  const int flags =
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX;
  if (sqlite3_open_v2(path.c_str(), &db, flags, nullptr) != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close_v2(db);
    return absl::UnavailableError(
        absl::StrCat("cannot open database '", path, "': ", msg));
  }
  sqlite3_busy_timeout(db, 5000);
  auto storage = std::make_unique<SqliteStorage>(db);
  if (auto s = storage->Init(); !s.ok()) return s;
  return std::unique_ptr<BankStorage>(std::move(storage));
}

}  // namespace engram::core
