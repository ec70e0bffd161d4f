// parity_harness: a small, deterministic driver for one llama.cpp-family engine.
//
// One request per process. The request is the command line; bulk data goes through files; one JSON
// status object is printed on stdout (nothing else is written to stdout). Engine logs go to stderr
// (warnings and errors only unless --verbose); the tail of the engine log is also kept in the JSON
// status when something fails.
//
//   parity_harness info
//   parity_harness vocab    --model M --out VOCAB.tsv
//   parity_harness tokenize --model M --text-file T --add-special 0|1 --parse-special 0|1
//   parity_harness eval     --model M --ids-file IDS.i32 --out LOGITS.f32
//                           [--threads N] [--n-ctx N] [--n-batch N] [--n-ubatch N]
//                           [--type-k f32|f16] [--type-v f32|f16] [--v-f16-fallback 0|1]
//
// vocab output: a TSV with one line per token: id, attribute bits, base kind, hex of the token text as
// stored in the vocabulary, hex of its piece (llama_token_to_piece, special=true).
// eval input: little-endian int32 token ids; output: float32 row-major [n_tokens, n_vocab], row i =
// logits after ids[0..i], computed in ONE llama_decode call with every position marked as output,
// on a fresh context (cache cleared), flash attention off.
//
// The llama.h generation is detected at configure time (CMake check_cxx_source_compiles) and
// handed in as PH_HAVE_* macros; the detected generation is reported in every status line.

#include "llama.h"

#include <link.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#ifndef PH_HARNESS_VERSION
#define PH_HARNESS_VERSION "1"
#endif

namespace {

// ---------------------------------------------------------------- API generation (from probes)

#if defined(PH_HAVE_MODEL_GET_VOCAB)
const char * const kGeneration = "2025+";
#else
const char * const kGeneration = "2024-10";
#endif

std::vector<std::string> api_features() {
    std::vector<std::string> f;
#ifdef PH_HAVE_MODEL_GET_VOCAB
    f.push_back("llama_model_get_vocab");
#endif
#ifdef PH_HAVE_MODEL_LOAD_FROM_FILE
    f.push_back("llama_model_load_from_file");
#endif
#ifdef PH_HAVE_INIT_FROM_MODEL
    f.push_back("llama_init_from_model");
#endif
#ifdef PH_HAVE_MODEL_FREE
    f.push_back("llama_model_free");
#endif
#ifdef PH_HAVE_MEMORY_CLEAR
    f.push_back("llama_memory_clear");
#endif
#ifdef PH_HAVE_KV_SELF_CLEAR
    f.push_back("llama_kv_self_clear");
#endif
#ifdef PH_HAVE_KV_CACHE_CLEAR
    f.push_back("llama_kv_cache_clear");
#endif
#ifdef PH_HAVE_FLASH_ATTN_TYPE
    f.push_back("cparams.flash_attn_type");
#endif
#ifdef PH_HAVE_FLASH_ATTN_BOOL
    f.push_back("cparams.flash_attn");
#endif
    return f;
}

// ---------------------------------------------------------------- JSON output

std::string json_escape(const std::string & s) {
    std::string out;
    out.reserve(s.size() + 2);
    out += '"';
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20 || c >= 0x7f) {
                    // bytes >= 0x80 are escaped one by one as \u00XX: the status line stays ASCII;
                    // the only free text here is log output and paths.
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += static_cast<char>(c);
                }
        }
    }
    out += '"';
    return out;
}

class Json {
  public:
    Json & str(const std::string & k, const std::string & v) { return raw(k, json_escape(v)); }
    Json & num(const std::string & k, long long v) { return raw(k, std::to_string(v)); }
    Json & dbl(const std::string & k, double v) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.6f", v);
        return raw(k, buf);
    }
    Json & boolean(const std::string & k, bool v) { return raw(k, v ? "true" : "false"); }
    Json & strs(const std::string & k, const std::vector<std::string> & v) {
        std::string s = "[";
        for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + json_escape(v[i]);
        return raw(k, s + "]");
    }
    Json & ints(const std::string & k, const std::vector<llama_token> & v) {
        std::string s = "[";
        for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
        return raw(k, s + "]");
    }
    Json & raw(const std::string & k, const std::string & v) {
        body_ += (body_.empty() ? "" : ",") + json_escape(k) + ":" + v;
        return *this;
    }
    std::string dump() const { return "{" + body_ + "}"; }

  private:
    std::string body_;
};

// ---------------------------------------------------------------- engine log capture

struct LogState {
    bool verbose = false;
    std::deque<std::string> tail;
    std::string partial;
};
LogState g_log;

void log_callback(enum ggml_log_level level, const char * text, void * /*user_data*/) {
    if (text == nullptr) return;
    g_log.partial += text;
    size_t nl;
    while ((nl = g_log.partial.find('\n')) != std::string::npos) {
        g_log.tail.push_back(g_log.partial.substr(0, nl));
        if (g_log.tail.size() > 20) g_log.tail.pop_front();
        g_log.partial.erase(0, nl + 1);
    }
    if (g_log.verbose || level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

std::vector<std::string> log_tail() {
    std::vector<std::string> v(g_log.tail.begin(), g_log.tail.end());
    if (!g_log.partial.empty()) v.push_back(g_log.partial);
    return v;
}

// ---------------------------------------------------------------- loaded libraries

int collect_lib(struct dl_phdr_info * info, size_t /*size*/, void * data) {
    auto * out = static_cast<std::vector<std::string> *>(data);
    if (info->dlpi_name == nullptr || info->dlpi_name[0] == '\0') return 0;
    std::string name = info->dlpi_name;
    const size_t slash = name.rfind('/');
    const std::string base = slash == std::string::npos ? name : name.substr(slash + 1);
    if (base.find("llama") != std::string::npos || base.find("ggml") != std::string::npos) {
        out->push_back(name);
    }
    return 0;
}

std::vector<std::string> loaded_engine_libraries() {
    std::vector<std::string> libs;
    dl_iterate_phdr(collect_lib, &libs);
    return libs;
}

// ---------------------------------------------------------------- arguments

struct Args {
    std::string command;
    std::map<std::string, std::string> opts;

    bool has(const std::string & k) const { return opts.count(k) != 0; }
    std::string get(const std::string & k, const std::string & dflt = "") const {
        auto it = opts.find(k);
        return it == opts.end() ? dflt : it->second;
    }
    long long get_int(const std::string & k, long long dflt) const {
        auto it = opts.find(k);
        if (it == opts.end()) return dflt;
        char * end = nullptr;
        const long long v = std::strtoll(it->second.c_str(), &end, 10);
        if (end == it->second.c_str() || *end != '\0') throw std::string("option --" + k + " needs an integer");
        return v;
    }
};

Args parse_args(int argc, char ** argv) {
    Args a;
    if (argc < 2) throw std::string("usage: parity_harness info|vocab|tokenize|eval [--opt value ...]");
    a.command = argv[1];
    for (int i = 2; i < argc; ++i) {
        std::string k = argv[i];
        if (k == "--verbose") {
            a.opts["verbose"] = "1";
            continue;
        }
        if (k.rfind("--", 0) != 0 || i + 1 >= argc) throw std::string("bad argument: " + k);
        a.opts[k.substr(2)] = argv[++i];
    }
    return a;
}

// ---------------------------------------------------------------- failures

struct Failure {
    int code;
    std::string stage;
    std::string message;
};

[[noreturn]] void fail(int code, const std::string & stage, const std::string & message) {
    throw Failure{code, stage, message};
}

Json base_status(const std::string & command) {
    Json j;
    j.str("harness_version", PH_HARNESS_VERSION)
        .str("command", command)
        .str("api_generation", kGeneration)
        .strs("api_features", api_features());
    return j;
}

// ---------------------------------------------------------------- thin API shims

struct Engine {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;

    ~Engine() {
        if (ctx != nullptr) llama_free(ctx);
        if (model != nullptr) {
#ifdef PH_HAVE_MODEL_FREE
            llama_model_free(model);
#else
            llama_free_model(model);
#endif
        }
    }
};

llama_model * load_model(const std::string & path, bool vocab_only) {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.vocab_only = vocab_only;
#ifdef PH_HAVE_MODEL_LOAD_FROM_FILE
    return llama_model_load_from_file(path.c_str(), mp);
#else
    return llama_load_model_from_file(path.c_str(), mp);
#endif
}

#ifdef PH_HAVE_MODEL_GET_VOCAB
using VocabHandle = const llama_vocab *;
VocabHandle vocab_of(const llama_model * m) { return llama_model_get_vocab(m); }
int32_t n_vocab(VocabHandle v) { return llama_vocab_n_tokens(v); }
const char * token_text(VocabHandle v, llama_token t) { return llama_vocab_get_text(v, t); }
int token_attr(VocabHandle v, llama_token t) { return static_cast<int>(llama_vocab_get_attr(v, t)); }
llama_token bos_of(VocabHandle v) { return llama_vocab_bos(v); }
llama_token eos_of(VocabHandle v) { return llama_vocab_eos(v); }
bool add_bos_of(VocabHandle v) { return llama_vocab_get_add_bos(v); }
bool add_eos_of(VocabHandle v) { return llama_vocab_get_add_eos(v); }
#else
using VocabHandle = const llama_model *;
VocabHandle vocab_of(const llama_model * m) { return m; }
int32_t n_vocab(VocabHandle v) { return llama_n_vocab(v); }
const char * token_text(VocabHandle v, llama_token t) { return llama_token_get_text(v, t); }
int token_attr(VocabHandle v, llama_token t) { return static_cast<int>(llama_token_get_attr(v, t)); }
llama_token bos_of(VocabHandle v) { return llama_token_bos(v); }
llama_token eos_of(VocabHandle v) { return llama_token_eos(v); }
bool add_bos_of(VocabHandle v) { return llama_add_bos_token(v); }
bool add_eos_of(VocabHandle v) { return llama_add_eos_token(v); }
#endif

void clear_cache(llama_context * ctx) {
#if defined(PH_HAVE_MEMORY_CLEAR)
    llama_memory_clear(llama_get_memory(ctx), true);
#elif defined(PH_HAVE_KV_SELF_CLEAR)
    llama_kv_self_clear(ctx);
#else
    llama_kv_cache_clear(ctx);
#endif
}

void disable_flash_attn(llama_context_params & cp) {
#if defined(PH_HAVE_FLASH_ATTN_TYPE)
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
#else
    cp.flash_attn = false;
#endif
}

const char * kind_name(int attr) {
    // base kind from the attribute bits (LLAMA_TOKEN_ATTR_*), most specific first (the same order as
    // the llama-cpp-python lane); the flag bits above BYTE are reported separately (raw attr column)
    if (attr & LLAMA_TOKEN_ATTR_UNKNOWN) return "unknown";
    if (attr & LLAMA_TOKEN_ATTR_UNUSED) return "unused";
    if (attr & LLAMA_TOKEN_ATTR_CONTROL) return "control";
    if (attr & LLAMA_TOKEN_ATTR_USER_DEFINED) return "user_defined";
    if (attr & LLAMA_TOKEN_ATTR_BYTE) return "byte";
    if (attr & LLAMA_TOKEN_ATTR_NORMAL) return "normal";
    return "undefined";
}

std::string to_hex(const char * s, size_t n) {
    static const char * digits = "0123456789abcdef";
    std::string out;
    const unsigned char * p = reinterpret_cast<const unsigned char *>(s);
    for (size_t i = 0; i < n; ++i) {
        out += digits[p[i] >> 4];
        out += digits[p[i] & 15];
    }
    return out;
}

// The readable piece of one token (llama_token_to_piece, special tokens rendered, no lstrip).
std::string token_piece(VocabHandle v, llama_token t) {
    std::vector<char> buf(64);
    int32_t n = llama_token_to_piece(v, t, buf.data(), static_cast<int32_t>(buf.size()), 0, true);
    if (n < 0) {
        buf.resize(static_cast<size_t>(-n));
        n = llama_token_to_piece(v, t, buf.data(), static_cast<int32_t>(buf.size()), 0, true);
    }
    return n > 0 ? std::string(buf.data(), static_cast<size_t>(n)) : std::string();
}

std::string read_file(const std::string & path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(6, "io", "cannot read " + path);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

ggml_type parse_type(const std::string & s) {
    if (s == "f32") return GGML_TYPE_F32;
    if (s == "f16") return GGML_TYPE_F16;
    fail(1, "args", "unsupported KV cache type '" + s + "' (use f32 or f16)");
}

const char * type_name(ggml_type t) { return t == GGML_TYPE_F32 ? "f32" : t == GGML_TYPE_F16 ? "f16" : "?"; }

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---------------------------------------------------------------- commands

void cmd_info(Json & j) {
    j.str("system_info", llama_print_system_info());
    j.strs("libraries", loaded_engine_libraries());
}

void cmd_vocab(const Args & a, Json & j) {
    Engine e;
    e.model = load_model(a.get("model"), true);
    if (e.model == nullptr) fail(2, "load_model", "cannot load model " + a.get("model"));
    VocabHandle v = vocab_of(e.model);
    const int32_t n = n_vocab(v);
    const std::string out_path = a.get("out");
    FILE * out = std::fopen(out_path.c_str(), "wb");
    if (out == nullptr) fail(6, "io", "cannot write " + out_path);
    for (llama_token t = 0; t < n; ++t) {
        const char * text = token_text(v, t);
        const int attr = token_attr(v, t);
        const std::string piece = token_piece(v, t);
        std::fprintf(out, "%d\t%d\t%s\t%s\t%s\n", t, attr, kind_name(attr),
                     to_hex(text ? text : "", text ? std::strlen(text) : 0).c_str(),
                     to_hex(piece.data(), piece.size()).c_str());
    }
    if (std::fclose(out) != 0) fail(6, "io", "cannot write " + out_path);
    j.num("n_vocab", n).num("bos_id", bos_of(v)).num("eos_id", eos_of(v));
    j.boolean("add_bos", add_bos_of(v)).boolean("add_eos", add_eos_of(v));
    j.str("vocab_path", out_path);
}

void cmd_tokenize(const Args & a, Json & j) {
    Engine e;
    e.model = load_model(a.get("model"), true);
    if (e.model == nullptr) fail(2, "load_model", "cannot load model " + a.get("model"));
    VocabHandle v = vocab_of(e.model);
    const std::string text = read_file(a.get("text-file"));
    const bool add_special = a.get_int("add-special", 0) != 0;
    const bool parse_special = a.get_int("parse-special", 0) != 0;
    std::vector<llama_token> ids(text.size() + 8);
    int32_t n = llama_tokenize(v, text.data(), static_cast<int32_t>(text.size()), ids.data(),
                               static_cast<int32_t>(ids.size()), add_special, parse_special);
    if (n < 0) {
        ids.resize(static_cast<size_t>(-n));
        n = llama_tokenize(v, text.data(), static_cast<int32_t>(text.size()), ids.data(),
                           static_cast<int32_t>(ids.size()), add_special, parse_special);
    }
    if (n < 0) fail(4, "tokenize", "llama_tokenize failed with " + std::to_string(n));
    ids.resize(static_cast<size_t>(n));
    j.boolean("add_special", add_special).boolean("parse_special", parse_special);
    j.num("n_bytes", static_cast<long long>(text.size())).ints("ids", ids);
}

void cmd_eval(const Args & a, Json & j) {
    const std::string raw = read_file(a.get("ids-file"));
    if (raw.size() % 4 != 0 || raw.empty()) fail(1, "args", "ids file must hold >= 1 little-endian int32");
    std::vector<llama_token> ids(raw.size() / 4);
    std::memcpy(ids.data(), raw.data(), raw.size());
    const int32_t n_tokens = static_cast<int32_t>(ids.size());

    const int32_t threads = static_cast<int32_t>(a.get_int("threads", 2));
    const int32_t n_ctx = static_cast<int32_t>(a.get_int("n-ctx", n_tokens > 512 ? n_tokens : 512));
    const int32_t n_batch = static_cast<int32_t>(a.get_int("n-batch", n_ctx));
    const int32_t n_ubatch = static_cast<int32_t>(a.get_int("n-ubatch", n_batch));
    if (n_ctx < n_tokens || n_batch < n_tokens || n_ubatch < n_tokens) {
        fail(1, "args", "n_ctx, n_batch and n_ubatch must all be >= the number of tokens (one batch, one ubatch)");
    }
    const ggml_type type_k = parse_type(a.get("type-k", "f32"));
    ggml_type type_v = parse_type(a.get("type-v", "f32"));
    const bool v_fallback = a.get_int("v-f16-fallback", 1) != 0;

    Engine e;
    const auto t0 = std::chrono::steady_clock::now();
    e.model = load_model(a.get("model"), false);
    if (e.model == nullptr) fail(2, "load_model", "cannot load model " + a.get("model"));
    const double t_load = seconds_since(t0);
    VocabHandle v = vocab_of(e.model);
    const int32_t nv = n_vocab(v);
    for (llama_token t : ids) {
        if (t < 0 || t >= nv) fail(1, "args", "token id " + std::to_string(t) + " outside the vocabulary");
    }

    std::string v_note;
    for (int attempt = 0; attempt < 2 && e.ctx == nullptr; ++attempt) {
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = static_cast<uint32_t>(n_ctx);
        cp.n_batch = static_cast<uint32_t>(n_batch);
        cp.n_ubatch = static_cast<uint32_t>(n_ubatch);
        cp.n_seq_max = 1;
        cp.n_threads = threads;
        cp.n_threads_batch = threads;
        cp.type_k = type_k;
        cp.type_v = type_v;
        cp.embeddings = false;
        cp.offload_kqv = false;  // CPU only; same value as the llama-cpp-python lane
        disable_flash_attn(cp);
#ifdef PH_HAVE_INIT_FROM_MODEL
        e.ctx = llama_init_from_model(e.model, cp);
#else
        e.ctx = llama_new_context_with_model(e.model, cp);
#endif
        if (e.ctx == nullptr && type_v != GGML_TYPE_F16 && v_fallback) {
            // October-2024 llama.cpp refuses a non-F16 V cache without flash attention
            // ("V cache quantization requires flash_attn"): fall back to F16 V and say so.
            const auto tail = log_tail();
            v_note = "context refused type_v=" + std::string(type_name(type_v)) + " without flash attention (" +
                     (tail.empty() ? std::string("no log") : tail.back()) + "); used f16";
            type_v = GGML_TYPE_F16;
        } else {
            break;
        }
    }
    if (e.ctx == nullptr) fail(3, "new_context", "cannot create a context");

    clear_cache(e.ctx);
    llama_batch batch = llama_batch_init(n_tokens, 0, 1);
    for (int32_t i = 0; i < n_tokens; ++i) {
        batch.token[i] = ids[static_cast<size_t>(i)];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n_tokens;
    const auto t1 = std::chrono::steady_clock::now();
    const int32_t rc = llama_decode(e.ctx, batch);
    const double t_decode = seconds_since(t1);
    if (rc != 0) {
        llama_batch_free(batch);
        fail(5, "decode", "llama_decode returned " + std::to_string(rc));
    }

    const std::string out_path = a.get("out");
    FILE * out = std::fopen(out_path.c_str(), "wb");
    if (out == nullptr) {
        llama_batch_free(batch);
        fail(6, "io", "cannot write " + out_path);
    }
    bool ok = true;
    for (int32_t i = 0; i < n_tokens && ok; ++i) {
        const float * row = llama_get_logits_ith(e.ctx, i);
        if (row == nullptr) {
            ok = false;
            break;
        }
        ok = std::fwrite(row, sizeof(float), static_cast<size_t>(nv), out) == static_cast<size_t>(nv);
    }
    llama_batch_free(batch);
    if (std::fclose(out) != 0) ok = false;
    if (!ok) fail(6, "io", "cannot fetch or write the logits to " + out_path);

    j.num("n_tokens", n_tokens).num("n_vocab", nv).str("logits_path", out_path).str("dtype", "float32");
    Json s;
    s.num("threads", threads).num("n_ctx", n_ctx).num("n_batch", n_batch).num("n_ubatch", n_ubatch);
    s.num("n_ctx_actual", static_cast<long long>(llama_n_ctx(e.ctx)));
    s.str("type_k", type_name(type_k)).str("type_v", type_name(type_v)).boolean("flash_attn", false);
    s.boolean("offload_kqv", false).num("n_seq_max", 1).boolean("one_batch", true);
    if (!v_note.empty()) s.str("type_v_note", v_note);
    j.raw("settings", s.dump());
    j.dbl("seconds_load", t_load).dbl("seconds_decode", t_decode);
    j.strs("libraries", loaded_engine_libraries());
}

}  // namespace

int main(int argc, char ** argv) {
    std::string command = argc > 1 ? argv[1] : "";
    int code = 0;
    Json status = base_status(command);
    try {
        Args a = parse_args(argc, argv);
        g_log.verbose = a.has("verbose");
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
        if (a.command != "info" && !a.has("model")) fail(1, "args", "--model is required");
        if (a.command == "info") {
            cmd_info(status);
        } else if (a.command == "vocab") {
            if (!a.has("out")) fail(1, "args", "--out is required");
            cmd_vocab(a, status);
        } else if (a.command == "tokenize") {
            if (!a.has("text-file")) fail(1, "args", "--text-file is required");
            cmd_tokenize(a, status);
        } else if (a.command == "eval") {
            if (!a.has("ids-file") || !a.has("out")) fail(1, "args", "--ids-file and --out are required");
            cmd_eval(a, status);
        } else {
            fail(1, "args", "unknown command '" + a.command + "' (info, vocab, tokenize, eval)");
        }
        status.boolean("ok", true);
        llama_backend_free();
    } catch (const Failure & f) {
        code = f.code;
        status.boolean("ok", false).str("stage", f.stage).str("error", f.message).strs("engine_log_tail", log_tail());
    } catch (const std::string & msg) {
        code = 1;
        status.boolean("ok", false).str("stage", "args").str("error", msg);
    }
    std::fputs((status.dump() + "\n").c_str(), stdout);
    std::fflush(stdout);
    return code;
}
