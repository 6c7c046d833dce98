/* The replay buffer's CPU sampling path as one C function (sacglam/replay/clib.py builds and loads it;
 * sacglam/replay/native.py's NativeSampler calls it).
 *
 * It computes exactly what TorchSampler.sample_from_draws (sacglam/replay/sampler.py) computes with ~100 torch ops,
 * from the same draws and the same derived tables (see sacglam/replay/storage.py for their layout), in passes over the
 * batch:
 *   A. the sampled storage row of each transition (column window + uniform offset, or a rarity row);
 *   B0. prefetches: the rows pass B reads (episode, n-step window, HER sources);
 *   B. per transition, A2: a prefetch of the token records pass C reads (into L2); then the scalars: HER
 *      relabelling (plain or rarest-of-m), the reward and termination recomputed for the new goal (the equality
 *      reward), the n-step window, the bootstrap row;
 *   C. the token copies: both prompts ([bos?] + pre + goal + mid | obs | post | pad) and both candidate sets, with
 *      software prefetch of the rows a few transitions ahead (again: see there).
 * On CPU the batch is bound by random reads of ~1-2 KB of token rows per transition and by writing ~2.6 KB of int32
 * ids and bool masks; the prefetch passes keep many rows in flight instead of waiting for each, and the ~100 op
 * dispatches of the torch path become one call. `scripts/bench_buffer.py --passes` times each pass.
 *
 * Integer arithmetic follows torch's: float -> int64 conversions truncate (all operands are >= 0), `%` is a floor
 * modulo, argmin takes the first minimum. Floats: draws are float64 as torch draws them; rewards, discounts and
 * returns are float32, with gamma's powers precomputed by torch (so they are bit-identical).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the candidate-mask words assume a little-endian CPU"
#endif

typedef struct {
    /* storage and derived tables (fixed between loads) */
    const int32_t *rows;          /* [CN, row_w]: step, episode slot, goal, ach_before, terminated, action, obs_len,
                                     next_obs_len, reward bits, logp bits, achieved (G) */
    const int32_t *ranks;         /* [CN, rank_w]: t', count, max(count - 1, 0), goals (G) */
    const int32_t *eps;           /* [S * N, 2]: ep_len, ep_ach */
    const int64_t *goal_count;    /* [max_goals] */
    const int64_t *goal_limit;    /* [max_goals] */
    const int32_t *goal_len;      /* [max_goals] */
    const int32_t *heads;         /* [max_goals, head_w]: [bos?] + pre + goal + mid, right padded */
    /* a row's tokens are one record [obs | cands | cand_len | next_obs | next_cands | next_cand_len] of tok_w
     * entries (int16 or int32, candidate lengths included); these point at each field's first row */
    const void *obs, *next_obs;   /* [Lo] */
    const void *cands, *next_cands;          /* [K * Lc] */
    const void *cand_len, *next_cand_len;    /* [K] */
    const int64_t *policy_version;           /* [CN] */
    const int32_t *post;          /* [n_post] */
    const float *powers;          /* [n_step + 1]: gamma ** j in float32, as torch computes it */
    int64_t row_w, rank_w, head_w, n_post, tok_w;
    int64_t N, CN, n_step, G, Lo, K, Lc, Lp, pre_mid, token_bytes, pad_id;
    int64_t strategy;             /* 0 future, 1 episode, 2 final */
    int64_t her_on, m;            /* relabelling on (ratio > 0); m = rarity_draws */
    double ratio;
    /* column window (refreshed after each add) */
    const int64_t *cum, *base;    /* [N] */
    double total_f;
    int64_t total_m1;
    /* rarity weights (refreshed after each add): row r is drawn for u in [rare_cdf[r - 1], rare_cdf[r]) */
    const double *rare_cdf;       /* [CN] */
    double rare_total;            /* just below rare_cdf[CN - 1] */
    /* per call */
    const double *draws;          /* [B, draw_w] */
    int64_t draw_w, B;
    const double *rare_u;         /* [R] uniforms of the rows drawn by rarity; they replace the last R picks */
    int64_t R;
    int64_t *scratch;             /* [6, B]: z, flat row, bootstrap row, next obs length, obs length, goal length */
    /* outputs */
    int32_t *prompt_ids, *next_prompt_ids;   /* [B, Lp] */
    uint8_t *prompt_mask, *next_prompt_mask; /* [B, Lp] */
    int32_t *cand_ids, *next_cand_ids;       /* [B, K * Lc] */
    uint8_t *cand_mask, *next_cand_mask;     /* [B, K * Lc] */
    int64_t *action, *n_steps, *goal, *goal_gap, *goal_limit_out, *policy_version_out; /* [B] */
    float *reward, *discount, *logp; /* [B] */
    uint8_t *terminated, *truncated, *relabelled; /* [B] */
    int64_t threads;              /* threads to split the batch over (1 = the caller's only) */
} SampleArgs;

enum { T_ = 0, EPK = 1, GOAL = 2, ACHB = 3, TERM = 4, ACT = 5, OL = 6, NOL = 7, REW = 8, LOGP = 9, F = 10 };
#define PREFETCH_AHEAD 3
#define MAX_DRAWS 64
#define MAX_NSTEP 256
#define MAX_THREADS 16
#define ONES UINT64_C(0x0101010101010101)

static inline int64_t fmod64(int64_t a, int64_t b) { int64_t r = a % b; return r < 0 ? r + b : r; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline float bits_to_float(int32_t bits) { float f; memcpy(&f, &bits, sizeof f); return f; }

/* A timing build (-DSACGLAM_TIMING, scripts/bench_buffer.py --passes) sums the wall time of each pass of the range
 * that starts the batch (the caller's thread) into sacglam_pass_us: A, B0, B (with A2), C, then the number of
 * calls. */
#ifdef SACGLAM_TIMING
#include <time.h>
double sacglam_pass_us[5];
static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec * 1e-3;
}
#define PASS_START() double pass_t = now_us()
#define PASS_END(k)                                        \
    do {                                                   \
        const double t_ = now_us();                        \
        if (lo == 0) sacglam_pass_us[k] += t_ - pass_t;    \
        pass_t = t_;                                       \
    } while (0)
#else
#define PASS_START() ((void)0)
#define PASS_END(k) ((void)0)
#endif

/* Index of the first v[i] > x in a sorted v[0, n) (torch.searchsorted(v, x, right=True)): for the int64 column sizes
 * and the float64 rarity weights. */
#define UPPER_BOUND(name, T)                                         \
    static inline int64_t name(const T *v, int64_t n, T x) {         \
        int64_t lo = 0, hi = n;                                      \
        while (lo < hi) {                                            \
            const int64_t mid = (lo + hi) >> 1;                      \
            if (v[mid] <= x) lo = mid + 1; else hi = mid;            \
        }                                                            \
        return lo;                                                   \
    }
UPPER_BOUND(upper_bound, int64_t)
UPPER_BOUND(upper_bound_f64, double)

/* The achieving ranks the strategy may pick, [first, first + span) (span >= 1), for a row with ach_before achieving
 * steps before it in an episode of ep_ach; returns whether the range is non-empty (pick_achieving_rank in her.py). */
static inline int her_ranks(const SampleArgs *a, int64_t ach_before, int64_t ep_ach, int64_t *first, int64_t *span) {
    *first = a->strategy == 0 ? ach_before : a->strategy == 1 ? 0 : (ep_ach > 1 ? ep_ach - 1 : 0);
    *span = ep_ach - *first > 1 ? ep_ach - *first : 1;
    return ep_ach > *first;
}

/* The _ranks row of draw k (u = d[2] for the first draw, d[3 + k] for the others) of the transition at z, step t. */
static inline const int32_t *her_source(const SampleArgs *a, const double *d, int64_t k, int64_t z, int64_t t,
                                        int64_t first, int64_t span) {
    const double u = k == 0 ? d[2] : d[3 + k];
    const int64_t rank = first + min64((int64_t)(u * (double)span), span - 1);
    return a->ranks + fmod64(z + (rank - t) * a->N, a->CN) * a->rank_w;
}

static inline void prefetch_span(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
}

/* The same into L2 only (prefetcht1 on x86): a prefetch into L1 holds one of its few miss buffers (~24) until the line
 * arrives, which capped the token records in flight; into L2 many more wait at once, and pass C's own prefetch brings
 * each record on to L1 just before it is read. A call of 256 took 13-15% less time than with prefetches into L1
 * (interleaved A/B on a 2-core KVM guest, AMD EPYC Zen 4, 2026-12-07). */
static inline void prefetch_span_l2(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
}

/* dst[j] = field[row][j] for j < count as int32 (a field of the token record, row stride tok_w): int16 tokens are
 * widened, int32 tokens copied. */
static inline void widen(const SampleArgs *a, int32_t *dst, const void *field, int64_t row, int64_t count) {
    if (a->token_bytes == 2) {
        const int16_t *s = (const int16_t *)field + row * a->tok_w;
        for (int64_t j = 0; j < count; j++) dst[j] = s[j];
    } else {
        memcpy(dst, (const int32_t *)field + row * a->tok_w, (size_t)count * sizeof *dst);
    }
}

/* One prompt: head[:pre_mid + gl] | obs[:ol] | post | pad, and its mask. */
static inline void write_prompt(const SampleArgs *a, int32_t *ids, uint8_t *mask, int64_t g, int64_t gl,
                                const void *obs, int64_t row, int64_t ol) {
    const int64_t h = a->pre_mid + gl, Lp = a->Lp;
    memcpy(ids, a->heads + g * a->head_w, (size_t)h * sizeof *ids);
    widen(a, ids + h, obs, row, ol);
    int64_t p = h + ol;
    for (int64_t j = 0; j < a->n_post; j++) ids[p + j] = a->post[j];
    p += a->n_post;
    memset(mask, 1, (size_t)p);
    memset(mask + p, 0, (size_t)(Lp - p));
    for (; p < Lp; p++) ids[p] = (int32_t)a->pad_id;
}

/* MASK_WORDS[len]: the mask of a candidate of len tokens (len <= 8) as one little-endian word, bytes [0, len) = 1. */
static const uint64_t MASK_WORDS[9] = {
    0, ONES >> 56, ONES >> 48, ONES >> 40, ONES >> 32, ONES >> 24, ONES >> 16, ONES >> 8, ONES};

/* Candidate masks from the K stored lengths (add stores 0 <= len <= Lc): one table word per candidate when Lc = 8,
 * the common width; else a byte comparison. T is the token type, so the loop has no per-candidate branch. */
#define CAND_MASKS(T)                                                                                               \
    do {                                                                                                            \
        const T *len = (const T *)lens + row * a->tok_w;                                                            \
        if (Lc == 8) {                                                                                              \
            for (int64_t k = 0; k < K; k++) {                                                                       \
                const uint64_t l = (uint64_t)len[k];                                                                \
                memcpy(mask + k * 8, &MASK_WORDS[l > 8 ? 8 : l], 8);                                                \
            }                                                                                                       \
        } else {                                                                                                    \
            for (int64_t k = 0; k < K; k++)                                                                         \
                for (int64_t j = 0; j < Lc; j++) mask[k * Lc + j] = (uint8_t)(j < len[k]);                          \
        }                                                                                                           \
    } while (0)

static inline void write_cands(const SampleArgs *a, int32_t *ids, uint8_t *mask, const void *cands,
                               const void *lens, int64_t row) {
    const int64_t K = a->K, Lc = a->Lc;
    widen(a, ids, cands, row, K * Lc);
    if (a->token_bytes == 2) CAND_MASKS(int16_t); else CAND_MASKS(int32_t);
}

/* Transitions [lo, hi) of the batch: every pass reads and writes only its own rows of the outputs and scratch.
 * On x86-64 with glibc it is compiled three times (x86-64-v4 = AVX-512, v3 = AVX2, baseline) and the loader picks
 * the one the CPU runs: the token widening (int16 -> int32) is most of its instructions, and AVX2 widens 8 ids
 * per instruction where the baseline needs several per id. The library stays portable across a cluster's machines.
 * A compiler without these target names (GCC < 12) builds it once, with -DSACGLAM_NO_CLONES
 * (sacglam/replay/clib.py). */
#if defined(__x86_64__) && defined(__GLIBC__) && !defined(SACGLAM_NO_CLONES)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static void sample_range(const SampleArgs *a, int64_t lo, int64_t hi) {
    const int64_t B = a->B, N = a->N, CN = a->CN, n = a->n_step, G = a->G;
    int64_t *zs = a->scratch, *flats = a->scratch + B, *boots = a->scratch + 2 * B, *nols = a->scratch + 3 * B;
    int64_t *ols = a->scratch + 4 * B, *gls = a->scratch + 5 * B;
    const int64_t rec = a->tok_w * a->token_bytes, half = (a->Lo + a->K * a->Lc + a->K) * a->token_bytes;

    PASS_START();
    /* A. sampled rows */
    for (int64_t i = lo; i < hi; i++) {
        int64_t z;
        if (i < B - a->R) {
            int64_t x = min64((int64_t)(a->draws[i * a->draw_w] * a->total_f), a->total_m1);
            int64_t col = upper_bound(a->cum, N, x);
            z = a->base[col] + x * N;
        } else {
            /* a flat row r * N + col is z modulo C * N, and z is only used modulo C * N */
            const double u = a->rare_u[i - (B - a->R)] * a->rare_total;
            z = min64(upper_bound_f64(a->rare_cdf, CN, u), CN - 1);
        }
        zs[i] = z;
        flats[i] = fmod64(z, CN);
        __builtin_prefetch(a->rows + flats[i] * a->row_w);
        __builtin_prefetch(a->policy_version + flats[i]);  /* read in pass B: a random miss in a C N * 8 byte table */
    }

    PASS_END(0);
    /* B0. prefetch what B reads next: the episode row and the later window rows, then the HER source rows (their
     * index needs the episode's counts). Independent loads issued together, instead of one chain per transition. */
    for (int64_t i = lo; i < hi; i++) {
        const int32_t *row = a->rows + flats[i] * a->row_w;
        __builtin_prefetch(a->eps + (int64_t)row[EPK] * 2);
        for (int64_t j = 1; j < n; j++) __builtin_prefetch(a->rows + fmod64(zs[i] + j * N, CN) * a->row_w);
    }
    if (a->her_on) {
        for (int64_t i = lo; i < hi; i++) {
            const double *d = a->draws + i * a->draw_w;
            const int32_t *row = a->rows + flats[i] * a->row_w;
            int64_t first, span;
            her_ranks(a, row[ACHB], a->eps[(int64_t)row[EPK] * 2 + 1], &first, &span);
            for (int64_t k = 0; k < a->m; k++) __builtin_prefetch(her_source(a, d, k, zs[i], row[T_], first, span));
        }
    }

    PASS_END(1);
    /* B. scalars. Each transition first asks for the token record pass C reads, into L2 (A2: the whole record when
     * the bootstrap row is the sampled row, n_step = 1, else its first half; the next-state half of the bootstrap
     * row once it is known, n_step > 1), after the scalar rows of pass B0 so that those do not queue behind them.
     * Issued before pass C's stores compete for the same miss buffers, the records arrive about twice as fast as
     * when prefetched a few transitions ahead inside pass C alone; issued here rather than in a pass of their own,
     * the wait for them overlaps this pass's work (a call of 256: 7-9% less time at n_step = 1, 10-20% less at
     * n_step = 3), and into L2 rather than L1 many more are in flight (13-15% less again; prefetch_span_l2).
     * Interleaved A/B of the builds on a 2-core KVM guest, 2026-12-07. */
    float rew[MAX_NSTEP];
    uint8_t term[MAX_NSTEP];
    for (int64_t i = lo; i < hi; i++) {
        const double *d = a->draws + i * a->draw_w;
        const int64_t z = zs[i], flat = flats[i];
        prefetch_span_l2((const char *)a->obs + flat * rec, n == 1 ? rec : half);  /* A2 */
        const int32_t *row = a->rows + flat * a->row_w;
        const int64_t t = row[T_];
        const int32_t *ep = a->eps + (int64_t)row[EPK] * 2;
        for (int64_t j = 0; j < n; j++) {
            const int32_t *rj = j == 0 ? row : a->rows + fmod64(z + j * N, CN) * a->row_w;
            rew[j] = bits_to_float(rj[REW]);
            term[j] = rj[TERM] != 0;
        }
        int64_t goal = row[GOAL], gap = -1;
        uint8_t relabelled = 0;
        if (a->her_on) {
            int64_t first, span;
            const int eligible = her_ranks(a, row[ACHB], ep[1], &first, &span);
            const int32_t *src = 0;
            int64_t new_goal = -1, best_count = 0;
            for (int64_t k = 0; k < a->m; k++) {
                const int32_t *s = her_source(a, d, k, z, t, first, span);
                const int64_t q = min64((int64_t)(d[3] * (double)s[1]), s[2]);
                const int64_t g = s[3 + q];
                if (a->m == 1) { src = s; new_goal = g; break; }
                const int64_t c = a->goal_count[g > 0 ? g : 0];
                if (k == 0 || c < best_count) { best_count = c; src = s; new_goal = g; }
            }
            relabelled = (uint8_t)((d[1] < a->ratio) && eligible);
            if (relabelled) {
                goal = new_goal;
                gap = (int64_t)src[0] - t;
                for (int64_t j = 0; j < n; j++) {
                    const int32_t *rj = j == 0 ? row : a->rows + fmod64(z + j * N, CN) * a->row_w;
                    int hit = 0;
                    for (int64_t g = 0; g < G; g++) hit |= rj[F + g] == goal;
                    hit &= goal >= 0;
                    rew[j] = hit ? 1.0f : 0.0f;
                    term[j] = (uint8_t)hit;
                }
            }
        }
        const int64_t steps_left = (int64_t)ep[0] - t;
        int64_t k = n;
        uint8_t term_end, trunc_end;
        float ret = 0.0f;
        if (n == 1) {
            k = 1;
            term_end = term[0];
            ret = rew[0];
            trunc_end = (uint8_t)(!term_end && steps_left == 1);
        } else {
            for (int64_t j = 0; j < n; j++) {
                if (term[j] || j == steps_left - 1 || j == n - 1) { k = j + 1; break; }
            }
            for (int64_t j = 0; j < n; j++) ret += rew[j] * a->powers[j] * (j < k ? 1.0f : 0.0f);
            term_end = term[k - 1];
            trunc_end = (uint8_t)((k - 1 == steps_left - 1) && !term_end);
        }
        const int64_t boot = n == 1 ? flat : fmod64(z + (k - 1) * N, CN);
        const int32_t *last = n == 1 ? row : a->rows + boot * a->row_w;
        a->action[i] = row[ACT];
        a->reward[i] = ret;
        a->discount[i] = n == 1 ? (term_end ? 0.0f : a->powers[1]) : a->powers[k] * (term_end ? 0.0f : 1.0f);
        a->terminated[i] = term_end;
        a->truncated[i] = trunc_end;
        a->n_steps[i] = k;
        a->goal[i] = goal;
        a->relabelled[i] = relabelled;
        a->goal_gap[i] = gap;
        a->goal_limit_out[i] = a->goal_limit[goal];
        a->logp[i] = bits_to_float(row[LOGP]);
        a->policy_version_out[i] = a->policy_version[flat];
        boots[i] = boot;
        if (n > 1) prefetch_span_l2((const char *)a->next_obs + boot * rec, half);  /* A2 */
        ols[i] = row[OL];
        nols[i] = last[NOL];
        gls[i] = a->goal_len[goal];
    }

    PASS_END(2);
    /* C. tokens */
    const int64_t Lp = a->Lp, KL = a->K * a->Lc, tb = a->token_bytes;
    for (int64_t i = lo; i < hi; i++) {
        const int64_t ahead = i + PREFETCH_AHEAD;
        if (ahead < hi) {
            /* the two halves of the token record: [obs | cands | cand_len] at the sampled row, the next-state half
             * at the bootstrap row (the same row when n_step = 1: one contiguous block). Pass B (A2) asked for the
             * sampled rows already, but the ~0.7 MB this pass writes (1.2 MB with int64 ids) evicts much of that
             * from L2 before it is read: without asking again here the pass took twice as long with int64 ids (93
             * against 48 us a call of 256), and with int32 ids a call between SB3's calls, as in
             * scripts/bench_buffer.py, took 145 against 131 us (a warm call: 75 against 78 us, 2026-12-07). */
            prefetch_span((const char *)a->obs + flats[ahead] * a->tok_w * tb, half);
            prefetch_span((const char *)a->next_obs + boots[ahead] * a->tok_w * tb, half);
        }
        const int64_t g = a->goal[i];
        write_prompt(a, a->prompt_ids + i * Lp, a->prompt_mask + i * Lp, g, gls[i], a->obs, flats[i], ols[i]);
        write_prompt(a, a->next_prompt_ids + i * Lp, a->next_prompt_mask + i * Lp, g, gls[i], a->next_obs,
                     boots[i], nols[i]);
        write_cands(a, a->cand_ids + i * KL, a->cand_mask + i * KL, a->cands, a->cand_len, flats[i]);
        write_cands(a, a->next_cand_ids + i * KL, a->next_cand_mask + i * KL, a->next_cands, a->next_cand_len,
                    boots[i]);
    }
    PASS_END(3);
}


/* A pool of worker threads, started by the first call that splits a batch and kept for the process (creating a thread
 * per call cost ~30 us under a hypervisor, a quarter of a call). Worker w runs range w + 1 of each job. After a job it
 * spins briefly for the next one (sampling calls come in bursts), then sleeps on a condition variable, so an idle pool
 * costs nothing while the model trains. A forked child starts a fresh pool: the parent's threads are not copied. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    int64_t workers;              /* workers started */
    atomic_long gen;              /* job counter: a worker runs a job when it sees a new value */
    atomic_long pending;          /* workers that have not finished the current job */
    long alarms;                  /* sacglam_wake calls (under mu): a sleeping worker wakes to spin for a job */
    const SampleArgs *a;          /* the current job: T ranges of `chunk` transitions */
    int64_t chunk, T;
    long start_gen[MAX_THREADS];  /* gen when worker w was created: it waits for the job after that one */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL, 0, 0, {0}};
#define SPINS 4000  /* polls (each a pause instruction, ~25 ns here: ~100 us) before a waiting thread sleeps */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void *worker(void *p) {
    const int64_t w = (int64_t)(intptr_t)p;
    long seen = pool.start_gen[w];  /* not a fresh load: the job that made this worker may have been posted already */
    for (;;) {
        long g = atomic_load_explicit(&pool.gen, memory_order_acquire);
        for (int s = 0; g == seen && s < SPINS; s++) {
            cpu_relax();
            g = atomic_load_explicit(&pool.gen, memory_order_acquire);
        }
        if (g == seen) {
            pthread_mutex_lock(&pool.mu);
            const long alarms = pool.alarms;
            while ((g = atomic_load(&pool.gen)) == seen && pool.alarms == alarms)
                pthread_cond_wait(&pool.wake, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
            if (g == seen) continue;  /* woken ahead of a job (sacglam_wake): spin for it */
        }
        seen = g;
        if (w + 1 >= pool.T) continue;  /* this job uses fewer threads */
        sample_range(pool.a, min64((w + 1) * pool.chunk, pool.a->B), min64((w + 2) * pool.chunk, pool.a->B));
        if (atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.mu);
        }
    }
    return NULL;
}

static void pool_reset_in_child(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.workers = 0;
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_init(void) { pthread_atfork(NULL, NULL, pool_reset_in_child); }

/* Grows the pool to `want` workers (fewer if threads cannot be created); returns the number running. */
static int64_t pool_grow(int64_t want) {
    pthread_once(&pool_once, pool_init);
    while (pool.workers < want) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pool.start_gen[pool.workers] = atomic_load(&pool.gen);
        const int ok = pthread_create(&tid, &attr, worker, (void *)(intptr_t)pool.workers) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.workers++;
    }
    return pool.workers;
}

/* Threads a batch of B is split over: at most `threads`, with at least 64 transitions each. */
static int64_t split_threads(int64_t threads, int64_t B) {
    int64_t T = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (B < 64 * T) T = B / 64 > 1 ? B / 64 : 1;
    return T;
}

/* Wakes sleeping workers to spin for the next job: the caller calls it at the start of a sample, so that the
 * microseconds it spends on its side (drawing the uniforms, allocating the outputs) hide the wake-up, which costs tens
 * of microseconds under a hypervisor. Nothing happens while no pool runs or the batch will not be split. */
void sacglam_wake(int64_t threads, int64_t B) {
    if (pool.workers == 0 || split_threads(threads, B) == 1) return;
    pthread_mutex_lock(&pool.mu);
    pool.alarms++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
}

/* Returns 0 on success, 1 when m or n_step exceed the compiled limits (the caller falls back to torch).
 * With threads > 1 and a batch of at least 64 transitions per thread, the batch is split into contiguous ranges, one
 * per thread (the caller's thread takes the first); the result does not depend on the split. Calls must not overlap
 * (the buffer calls it from one thread; a second caller would wait on the pool's lock). */
int sacglam_sample(const SampleArgs *a) {
    if (a->m > MAX_DRAWS || a->n_step > MAX_NSTEP) return 1;
#ifdef SACGLAM_TIMING
    sacglam_pass_us[4] += 1;
#endif
    int64_t T = split_threads(a->threads, a->B);
    if (T > 1) T = 1 + pool_grow(T - 1);  /* no more threads to be had: the caller's share grows */
    if (T == 1) {
        sample_range(a, 0, a->B);
        return 0;
    }
    static pthread_mutex_t calls = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&calls);
    const int64_t chunk = (a->B + T - 1) / T;
    pool.a = a;
    pool.chunk = chunk;
    pool.T = T;
    atomic_store(&pool.pending, T - 1);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    sample_range(a, 0, min64(chunk, a->B));
    for (int s = 0; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0 && s < SPINS; s++) cpu_relax();
    if (atomic_load(&pool.pending) > 0) {
        pthread_mutex_lock(&pool.mu);
        while (atomic_load(&pool.pending) > 0) pthread_cond_wait(&pool.done, &pool.mu);
        pthread_mutex_unlock(&pool.mu);
    }
    pthread_mutex_unlock(&calls);
    return 0;
}
